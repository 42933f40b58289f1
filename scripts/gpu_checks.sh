#!/usr/bin/env bash
# The CUDA checks of issue 3 on a GPU machine, in stages sized for a short device lease.
#
#   bash scripts/gpu_checks.sh [STAGE ...]        # default: targets compile tests
#
# Stages, most important first (rough minutes on an H100/H200 with 16 CPU cores; compiling the
# paper U-Net dominates the compile stages):
#   targets     ~2  zoo bench-jvp, bf16, batch 128, ratios 0.25/0.75/1.0: eager fused and primal
#                   steps and the same replayed from a CUDA graph (--cuda-graph) — the issue's
#                   targets (<= 1.15 at 0.25, <= 1.40 at 1.0; 0.75 runs without OOM)
#   compile     ~5  the same with loss + backward compiled (--compile, mode default), fused at 0.25/1.0
#   compile-ro  ~5  --compile --compile-mode reduce-overhead (inductor + CUDA graphs), 0.25/1.0
#   bf16jvp     ~2  targets with loss.jvp_precision=bf16 (the cast-policy question)
#   tests       ~4  the CUDA-only tests: JVP modes, captured steps, compiled CUDA steps, fused
#   train       ~4  zoo train moons on CUDA: eager, cuda_graph, compile, compile reduce-overhead with
#                   grad_accum=2, and torchrun (one process, NCCL)
#
# Each stage runs under its own time limit (STAGE_TIMEOUT seconds, default 420) so one overrun
# cannot take the others' output with it, and writes at most two files (a log, a bench's JSON)
# under ${OUT:-outputs/gpu}: the device tool brings back at most 8 files per call.
# zoo's dependencies must be importable (README: the wheels for the device machine);
# trackio is not needed, tracking is off.  The device's own torch is older than zoo's pin (2.11.0 on
# the H200s): run `bash scripts/test_with_torch.sh 2.11.0 0.26.0` on a CPU first (device time is short).
set -uo pipefail
out="${OUT:-outputs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # zoo importable from the temporary run folder
limit="${STAGE_TIMEOUT:-420}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(targets compile tests)

python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"

bench() {  # name, then bench-jvp arguments; the table goes to the terminal, everything to the log
    local name="$1"; shift
    timeout "$limit" python3 -m zoo_cli.main bench-jvp --device cuda --precision bf16 --batch-size 128 \
        --repeats 7 --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^round\|^memory pass"
}

train_moons() {  # run name, then overrides; appends to train.log
    (cd "$work" && timeout "$limit" python3 -m zoo_cli.main train moons --steps 200 --device cuda --run-name "$@" \
        tracking.enabled=false experiment_log= 2>&1 | tail -16) | tee -a "$out/train.log"
}

for stage in "${stages[@]}"; do
    echo "=== stage $stage ($(date +%T))"
    start=$SECONDS
    case "$stage" in
        targets) bench bench-targets --modes fused,primal,cuda_graph --ratios 0.25,0.75,1.0 --cuda-graph ;;
        compile) bench bench-compile --modes fused --ratios 0.25,1.0 --compile ;;
        compile-ro) bench bench-compile-ro --modes fused --ratios 0.25,1.0 --compile --compile-mode reduce-overhead ;;
        bf16jvp) bench bench-bf16jvp --modes fused,primal --ratios 0.25,1.0 --cuda-graph loss.jvp_precision=bf16 ;;
        tests)
            timeout "$limit" python3 -m pytest -q -p no:cacheprovider tests/test_losses_jvp.py tests/test_models_dual.py \
                tests/test_models_layers.py tests/test_training_step_graph.py tests/test_training_compiled_step.py \
                -k "cuda or CUDA or graph or fused or replay or captured" 2>&1 | tee "$out/tests.log" | tail -15 ;;
        train)
            work="$(mktemp -d)"
            train_moons gpu-moons
            train_moons gpu-moons-graph train.cuda_graph=true
            train_moons gpu-moons-compile train.compile=true loss.jvp=fused
            train_moons gpu-moons-compile-ro train.compile=true train.compile_mode=reduce-overhead train.grad_accum=2 loss.jvp=fused
            # torchrun with one process: the NCCL process group, the gloo wait group, rank-0 evaluation.
            (cd "$work" && timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m zoo_cli.main \
                train moons --steps 100 --device cuda --run-name gpu-moons-ddp tracking.enabled=false experiment_log= 2>&1 \
                | tail -16) | tee -a "$out/train.log" ;;
        *) echo "unknown stage '$stage': choose from targets compile compile-ro bf16jvp tests train" >&2; exit 2 ;;
    esac
    echo "=== stage $stage took $((SECONDS - start)) s"
done
