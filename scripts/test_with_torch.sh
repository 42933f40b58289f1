#!/usr/bin/env bash
# Run zoo's test suite on this CPU under another torch than the pinned one — a GPU machine's own —
# before spending device time there: torch.compile tracing, torchrun flags and private APIs
# differ between releases.
#
#   bash scripts/test_with_torch.sh 2.11.0 0.26.0 [pytest args...]     # default: the whole suite
#
# Needs .venv (scripts/setup.sh) for zoo's other dependencies; the other torch goes into its own
# venv under ${ZOO_TORCH_VENVS:-/tmp}/zoo-torch-VERSION (a few GB from PyPI the first time) and
# comes first on its path; .venv's packages are reached through a .pth file.  Expect only
# tests/test_remote_modal_app.py::test_packages_are_the_local_install_pinned to fail (it checks
# the pin itself).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${1:?usage: $0 TORCH_VERSION TORCHVISION_VERSION [pytest args...]}"
vision_version="${2:?usage: $0 TORCH_VERSION TORCHVISION_VERSION [pytest args...]}"
shift 2
venv="${ZOO_TORCH_VENVS:-/tmp}/zoo-torch-$torch_version"
[ -x .venv/bin/python ] || { echo "no .venv: run bash scripts/setup.sh first" >&2; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "torch==$torch_version" "torchvision==$vision_version"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
main_site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$main_site" "$(pwd)" > "$site/zz_zoo_main_venv.pth"
# Tests start `zoo` and `trackio` as commands: the same entry points under this interpreter.
for tool in zoo trackio; do
  sed "1s|.*|#!$venv/bin/python|" ".venv/bin/$tool" > "$venv/bin/$tool" && chmod +x "$venv/bin/$tool"
done
"$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'
if [ $# -eq 0 ]; then set -- tests; fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider -p no:logging "$@"
