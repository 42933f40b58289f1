#!/usr/bin/env bash
# The CUDA checks of issue 3/4 on a GPU machine, in one go (zoo's dependencies importable;
# trackio is not needed: tracking is switched off here).  Writes logs under ${OUT:-outputs/gpu}.
#   1. the CUDA-only tests (JVP modes, CUDA graphs, captured training steps, fused on CUDA)
#   2. zoo bench-jvp --device cuda --precision bf16 --batch-size 128 --cuda-graph (the issue's
#      H100 targets; eager and captured steps), with the JVP in tf32 and in bf16; then compiled
#      steps (--compile, modes default and reduce-overhead; two ratios: each compiles the
#      paper U-Net once per case)
#   3. zoo train moons on CUDA: eager, with train.cuda_graph, with train.compile (and with
#      reduce-overhead over two micro-batches), and under torchrun (one process, NCCL)
set -uo pipefail
out="${OUT:-outputs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # zoo importable from the temporary run folder
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_losses_jvp.py tests/test_models_dual.py tests/test_models_layers.py \
    tests/test_training_step_graph.py tests/test_training_compiled_step.py \
    -k "cuda or CUDA or graph or fused or replay or captured" 2>&1 \
    | tee "$out/tests.log" | tail -15
bench() {  # name, then bench-jvp arguments
    local name="$1"; shift
    python3 -m zoo_cli.main bench-jvp --device cuda --precision bf16 --batch-size 128 --ratios 0.25,0.75,1.0 \
        --repeats 7 --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^round\|^memory pass"
}
bench bench-bf16-b128 --modes fused,primal,cuda_graph --cuda-graph
bench bench-bf16-b128-bf16jvp --modes fused,primal --cuda-graph loss.jvp_precision=bf16
bench bench-bf16-b128-compile --modes fused --ratios 0.25,0.75 --compile loss.jvp_precision=bf16
bench bench-bf16-b128-compile-ro --modes fused --ratios 0.25,0.75 --compile --compile-mode reduce-overhead loss.jvp_precision=bf16
work="$(mktemp -d)"
(cd "$work" && python3 -m zoo_cli.main train moons --steps 200 --device cuda --run-name gpu-moons \
    tracking.enabled=false experiment_log= 2>&1 | tail -16) | tee "$out/train.log"
(cd "$work" && python3 -m zoo_cli.main train moons --steps 200 --device cuda --run-name gpu-moons-graph \
    train.cuda_graph=true tracking.enabled=false experiment_log= 2>&1 | tail -16) | tee "$out/train-graph.log"
(cd "$work" && python3 -m zoo_cli.main train moons --steps 200 --device cuda --run-name gpu-moons-compile \
    train.compile=true loss.jvp=fused tracking.enabled=false experiment_log= 2>&1 | tail -16) | tee "$out/train-compile.log"
(cd "$work" && python3 -m zoo_cli.main train moons --steps 200 --device cuda --run-name gpu-moons-compile-ro \
    train.compile=true train.compile_mode=reduce-overhead train.grad_accum=2 loss.jvp=fused tracking.enabled=false \
    experiment_log= 2>&1 | tail -16) | tee "$out/train-compile-ro.log"
# torchrun with one process: the NCCL process group, the gloo wait group, rank-0 evaluation.
(cd "$work" && python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m zoo_cli.main train moons \
    --steps 100 --device cuda --run-name gpu-moons-ddp tracking.enabled=false experiment_log= 2>&1 | tail -16) \
    | tee "$out/train-ddp.log"
