#!/usr/bin/env bash
# Regenerate the README's results from a finished run: docs/assets/main_job_grid.png (64 one-step
# MeanFlow samples of the run's last.pt, seed 0, EMA weights) and the results table, printed as
# Markdown from the run's eval.json.
#
#   bash scripts/readme_assets.sh outputs/RUN
#
# ZOO and PYTHON pick the commands (default: the .venv that scripts/setup.sh makes).
set -euo pipefail
if [ $# -ne 1 ] || [ ! -f "$1/last.pt" ] || [ ! -f "$1/eval.json" ]; then
  echo "usage: bash scripts/readme_assets.sh RUN_DIR  (a finished run: RUN_DIR/last.pt and RUN_DIR/eval.json)" >&2
  exit 2
fi
run="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
zoo="${ZOO:-.venv/bin/zoo}"
python="${PYTHON:-.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
$zoo sample "$run/last.pt" --nfe 1 --n 64 --seed 0 --threads 1 --out "$tmp/grid.png"
mkdir -p docs/assets
cp "$tmp/grid.png" docs/assets/main_job_grid.png
echo "wrote docs/assets/main_job_grid.png"
$python scripts/readme_table.py "$run/eval.json"
