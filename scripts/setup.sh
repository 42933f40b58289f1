#!/usr/bin/env bash
# Set up zoo on a fresh Debian/Ubuntu machine: the real Fashion-MNIST (Debian package, when apt
# is there), a virtual environment in .venv, and zoo installed into it (editable, with test
# extras). Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing dataset-fashion-mnist (real Fashion-MNIST, offline)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist \
    || echo "setup: warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import zoo, zoo_cli, torch, modal, diffusers, cleanfid" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.zoo-installed ]; then
  echo "setup: installing zoo and its pinned dependencies into .venv (torch 2.14.1, torchvision 0.29.1)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.zoo-installed
fi
