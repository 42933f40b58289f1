#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
