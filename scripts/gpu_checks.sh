#!/usr/bin/env bash
# The CUDA checks of issue 3/4 on a GPU machine, in one go (zoo's dependencies importable;
# trackio is not needed: tracking is switched off here).  Writes logs under ${OUT:-outputs/gpu}.
#   1. the CUDA-only tests (JVP modes, CUDA graphs, fused on CUDA)
#   2. zoo bench-jvp --device cuda --precision bf16 --batch-size 128 (the H100 targets)
#   3. zoo train moons on CUDA, single process and under torchrun (one process, NCCL)
set -uo pipefail
out="${OUT:-outputs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # zoo importable from the temporary run folder
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_losses_jvp.py tests/test_models_dual.py tests/test_models_layers.py \
    -k "cuda or CUDA or graph or fused" 2>&1 | tee "$out/tests.log" | tail -15
python3 -m zoo_cli.main bench-jvp --device cuda --precision bf16 --batch-size 128 --ratios 0.25,0.75,1.0 \
    --repeats 7 --json "$out/bench-bf16-b128.json" 2>&1 | tee "$out/bench.log" | grep -v "^round\|^memory pass"
work="$(mktemp -d)"
(cd "$work" && python3 -m zoo_cli.main train moons --steps 200 --device cuda --run-name gpu-moons \
    tracking.enabled=false experiment_log= 2>&1 | tail -16) | tee "$out/train.log"
# torchrun with one process: the NCCL process group, the gloo wait group, rank-0 evaluation.
(cd "$work" && python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m zoo_cli.main train moons \
    --steps 100 --device cuda --run-name gpu-moons-ddp tracking.enabled=false experiment_log= 2>&1 | tail -16) \
    | tee "$out/train-ddp.log"
