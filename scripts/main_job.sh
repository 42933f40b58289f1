#!/usr/bin/env bash
# Set up (if needed) and run the main job: one-step MeanFlow on real Fashion-MNIST on the CPU,
# ending with a sample grid and the evaluation table (training ~15 min on 2 quiet cores, plus ~6 CPU-minutes
# the first time for the Fashion-MNIST feature network that scores the samples; EXPERIMENT_LOG.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zoo train fashion-mnist --run-name "fashion-mnist-$(date +%Y%m%d-%H%M%S)" "$@"
