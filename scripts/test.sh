#!/usr/bin/env bash
# Set up (if needed), check lint and formatting, and run the whole test suite: the README's test
# command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check zoo zoo_cli tests scripts
.venv/bin/ruff format --check zoo zoo_cli tests scripts
exec .venv/bin/python -m pytest "$@"
