#!/usr/bin/env bash
# Wheels of zoo's pure-Python dependencies for the GPU machine (Python 3.12 there, no network;
# its image has torch, numpy, pytest, click and pygments but not pydantic or tomli_w), into .whl/
# (git-ignored), at the versions .venv has here.  Then each device call carries ".whl" and starts:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$(pwd) || exit; \
#   OUT=$OUT bash scripts/gpu_checks.sh targets bf16jvp tests
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no .venv: run bash scripts/setup.sh first" >&2; exit 2; }
names=(pydantic pydantic_core pydantic-settings python-dotenv tomli_w annotated-types typing-inspection
       typing_extensions typer rich shellingham markdown-it-py mdurl)
pins=()
for name in "${names[@]}"; do
  pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
done
rm -rf .whl && mkdir .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls .whl && du -sh .whl
echo 'device call (carry [".whl"]): python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$(pwd) || exit; OUT=$OUT bash scripts/gpu_checks.sh targets bf16jvp tests'
