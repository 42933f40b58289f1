#!/usr/bin/env bash
# Regenerate the README's results from a finished run: docs/assets/main_job_grid.png (64 one-step
# MeanFlow samples of the run's last.pt, seed 0, EMA weights), docs/assets/main_job_quality.png
# (the evaluation's quality-vs-NFE plot, when it is there) and the results table, printed as
# Markdown from the evaluation's JSON (default: the run's eval.json; or the one `zoo eval --json`
# wrote).
#
#   bash scripts/readme_assets.sh outputs/RUN [EVAL_JSON]
#
# ZOO and PYTHON pick the commands (default: the .venv that scripts/setup.sh makes).
set -euo pipefail
eval_json="${2:-${1:-}/eval.json}"
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ ! -f "$1/last.pt" ] || [ ! -f "$eval_json" ]; then
  echo "usage: bash scripts/readme_assets.sh RUN_DIR [EVAL_JSON]  (a finished run: RUN_DIR/last.pt, and RUN_DIR/eval.json or EVAL_JSON)" >&2
  exit 2
fi
run="$(cd "$1" && pwd)"
eval_json="$(cd "$(dirname "$eval_json")" && pwd)/$(basename "$eval_json")"
quality="${eval_json%.json}_quality.png"
cd "$(dirname "$0")/.."
zoo="${ZOO:-.venv/bin/zoo}"
python="${PYTHON:-.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
$zoo sample "$run/last.pt" --nfe 1 --n 64 --seed 0 --threads 1 --out "$tmp/grid.png"
mkdir -p docs/assets
cp "$tmp/grid.png" docs/assets/main_job_grid.png
echo "wrote docs/assets/main_job_grid.png"
if [ -f "$quality" ]; then
  cp "$quality" docs/assets/main_job_quality.png
  echo "wrote docs/assets/main_job_quality.png"
fi
$python scripts/readme_table.py "$eval_json"
