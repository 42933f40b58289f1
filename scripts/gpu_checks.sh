#!/usr/bin/env bash
# zoo's CUDA checks on a GPU machine, in stages sized for a short device lease.
#
#   bash scripts/gpu_checks.sh [STAGE ...]        # default: targets bf16jvp tests
#
# Stages, most important first (rough minutes on a recent data-centre GPU with 16 CPU cores;
# compiling the paper U-Net dominates the compile stages):
#   targets     ~2  zoo bench-jvp, bf16, batch 128, ratios 0.25/0.75/1.0: eager fused and primal
#                   steps and the same replayed from a CUDA graph (--cuda-graph), against the GPU
#                   targets (<= 1.15 at 0.25, <= 1.40 at 1.0; 0.75 runs without OOM)
#   bf16jvp     ~1  the same with loss.jvp_precision=bf16, 0.25/1.0: the tangent's convolutions at
#                   bf16 rate
#   tests       ~2  the CUDA-only tests (JVP modes, captured steps, compiled CUDA steps); a skipped
#                   one is reported: all skipped means CUDA was not usable, not a pass
#   compile     ~5  fused with loss + backward compiled (--compile, mode default), 0.25/1.0
#   compile-ro  ~5  --compile --compile-mode reduce-overhead (inductor + CUDA graphs), 0.25/1.0
#   compile-bf16    ~5  compile with loss.jvp_precision=bf16: inductor fuses the casts, so the
#                   tangent's convolutions should run at bf16 rate
#   compile-ro-bf16 ~3  the same with reduce-overhead (inductor's on-disk cache, warm from
#                   compile-bf16 in the same call, spares part of the compiling)
#   torch-kernels  ~2  fused eager and captured steps, 0.25/1.0, with the default group-norm
#                   tangents (Triton kernels on CUDA) and, in the same process, with
#                   loss.jvp_kernels=torch (--loss-variant): the kernels' A/B in one run
#   profile     ~2  scripts/profile_step_cuda.py: kernel time by category of the FM and fused
#                   steps (tangent in TF32 and bf16): where a captured step's extra time goes
#   train       ~3  zoo train moons on CUDA: eager, cuda_graph, compile, compile reduce-overhead
#                   with grad_accum=2
#   assets      ~1  tests/test_real_assets.py on CUDA: the SD-VAE's from_pretrained round trip, the
#                   Inception weights, ADM's reference batch, found through ZOO_TEST_ASSETS (carried
#                   or already on the machine); each one missing is a SKIP with what to fetch
# What each stage measured so far, and the calls that ran them: EXPERIMENT_LOG.md.
#
# The device tool allows 600 s a call and about 15 min a lease, a machine start included; a
# call made within 30 s of the last one finds the machine warm.  For example, ~900 s in all:
#   call 1:  DEADLINE=560 OUT=$OUT bash scripts/gpu_checks.sh tests compile-bf16     (timeout_s 580)
#   call 2, within 30 s:  DEADLINE=<left - 40> OUT=$OUT bash scripts/gpu_checks.sh torch-kernels profile
# DEADLINE (seconds, default 560) bounds the whole call: each stage runs under
# min(STAGE_TIMEOUT (default 420), time left - 20 s) and is skipped with under 60 s left, so the
# logs of the stages that ran always come back.  `timeout -k 20` also kills a process that holds
# SIGTERM (zoo train finishes its step first; a step stuck in CUDA never would).  Each stage
# writes at most two files (a log, a bench's JSON) under ${OUT:-outputs/gpu}: the device tool
# brings back at most 8 files per call.  A bench killed at its limit writes no JSON; its log has
# every timed round.
# zoo's dependencies must be importable: `bash scripts/device_wheels.sh` here puts them in .whl/ and
# prints the line that installs them there (carry [".whl"]);
# trackio is not needed, tracking is off.  A device's own torch may be older than zoo's pin: run
# `bash scripts/test_with_torch.sh VERSION TORCHVISION_VERSION` on a CPU first (device time is short).
set -uo pipefail
out="${OUT:-outputs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # zoo importable from the temporary run folder
deadline=$((SECONDS + ${DEADLINE:-560}))
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(targets bf16jvp tests)

python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"

bench() {  # name, then bench-jvp arguments; the table goes to the terminal, everything to the log
    local name="$1"; shift
    timeout -k 20 "$limit" python3 -m zoo_cli.main bench-jvp --device cuda --precision bf16 --batch-size 128 \
        --repeats 7 --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^round\|^memory pass"
}

train_moons() {  # run name, then overrides; appends to train.log
    (cd "$work" && timeout -k 20 "$limit" python3 -m zoo_cli.main train moons --steps 200 --device cuda --run-name "$@" \
        tracking.enabled=false experiment_log= 2>&1 | tail -16) | tee -a "$out/train.log"
}

for stage in "${stages[@]}"; do
    left=$((deadline - SECONDS - 20))
    limit=$(( left < ${STAGE_TIMEOUT:-420} ? left : ${STAGE_TIMEOUT:-420} ))
    if [ "$limit" -lt 60 ]; then echo "=== stage $stage skipped: $((deadline - SECONDS)) s left of DEADLINE"; continue; fi
    echo "=== stage $stage ($(date +%T), limit $limit s)"
    start=$SECONDS
    case "$stage" in
        targets) bench bench-targets --modes fused,primal,cuda_graph --ratios 0.25,0.75,1.0 --cuda-graph ;;
        compile) bench bench-compile --modes fused --ratios 0.25,1.0 --compile ;;
        compile-ro) bench bench-compile-ro --modes fused --ratios 0.25,1.0 --compile --compile-mode reduce-overhead ;;
        compile-bf16) bench bench-compile-bf16 --modes fused --ratios 0.25,1.0 --compile loss.jvp_precision=bf16 ;;
        compile-ro-bf16) bench bench-compile-ro-bf16 --modes fused --ratios 0.25,1.0 --compile \
            --compile-mode reduce-overhead loss.jvp_precision=bf16 ;;
        torch-kernels) bench bench-torch-kernels --modes fused --ratios 0.25,1.0 --cuda-graph --loss-variant loss.jvp_kernels=torch ;;
        profile)
            timeout -k 20 "$limit" python3 scripts/profile_step_cuda.py --batch-size 128 --out "$out" 2>&1 \
                | tee "$out/profile.log" | tail -40 ;;
        bf16jvp) bench bench-bf16jvp --modes fused,primal --ratios 0.25,1.0 --cuda-graph loss.jvp_precision=bf16 ;;
        tests)
            # -rs names every skip: a CUDA test skipped on the GPU machine means CUDA was unusable.
            # -rfEs: failures, errors and skips listed.  No -q: pyproject's addopts has one, and
            # -qq would drop pytest's summary line.
            # The exit status printed is timeout's: pytest's own, or 124 / 137 when the stage limit stopped it.
            timeout -k 20 "$limit" python3 -m pytest -rfEs -p no:cacheprovider tests/test_losses_jvp.py \
                tests/test_models_dual.py tests/test_models_layers.py tests/test_training_step_graph.py \
                tests/test_training_compiled_step.py tests/test_group_norm_tangent_kernel.py -k "(cuda or replay or recapture or captured_step_follows) and not refuses" \
                2>&1 | tee "$out/tests.log" | tail -25
            echo "pytest exit status (through timeout) ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
            grep -q "SKIPPED" "$out/tests.log" && echo "!!! some CUDA tests were SKIPPED on the GPU machine: see tests.log"
            # pytest's last line ("N passed in T s") is missing when the stage's timeout killed it.
            grep -qE " in [0-9.]+s( \([0-9:]+\))?( =+)?$" "$out/tests.log" \
                || echo "!!! pytest ended without its summary line (killed by the stage limit of $limit s?): the tests are incomplete" ;;
        train)
            # (No torchrun here: with one process, a world of 1 starts no process group.)
            work="$(mktemp -d)"
            train_moons gpu-moons
            train_moons gpu-moons-graph train.cuda_graph=true
            train_moons gpu-moons-compile train.compile=true loss.jvp=fused
            train_moons gpu-moons-compile-ro train.compile=true train.compile_mode=reduce-overhead train.grad_accum=2 loss.jvp=fused ;;
        assets)
            timeout -k 20 "$limit" python3 -m pytest -rfEs -p no:cacheprovider tests/test_real_assets.py \
                2>&1 | tee "$out/assets.log" | tail -12
            echo "pytest exit status (through timeout) ${PIPESTATUS[0]}" | tee -a "$out/assets.log"
            grep -q "SKIPPED" "$out/assets.log" && echo "!!! some real assets were missing (SKIPPED): see assets.log" ;;
        *) echo "unknown stage '$stage': choose from targets bf16jvp tests compile compile-ro compile-bf16 compile-ro-bf16 torch-kernels profile train assets" >&2; exit 2 ;;
    esac
    echo "=== stage $stage took $((SECONDS - start)) s"
done
