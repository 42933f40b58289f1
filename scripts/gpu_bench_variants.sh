#!/usr/bin/env bash
# GPU measurements of what bounds the MeanFlow/FM step ratio:
# the CUDA tests again, then bench-jvp for fused / cuda_graph / primal at batch 128 with the
# JVP in tf32 (default) and in bf16, and at batch 256.  Logs under ${OUT:-outputs/gpu}.
set -uo pipefail
out="${OUT:-outputs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_losses_jvp.py tests/test_models_dual.py \
    -k "cuda or CUDA or graph or fused" 2>&1 | tee "$out/tests.log" | tail -4
bench() {  # name, then bench-jvp arguments
    local name="$1"; shift
    python3 -m zoo_cli.main bench-jvp --device cuda --precision bf16 --ratios 0.25,1.0 --modes fused,cuda_graph,primal \
        --repeats 7 --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" | grep -E "^│|JVP /|ratio [0-9]"
}
bench b128-tf32 --batch-size 128
bench b128-bf16jvp --batch-size 128 loss.jvp_precision=bf16
bench b256-tf32 --batch-size 256
