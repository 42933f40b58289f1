"""`zoo --help` and the run-management commands must not pay for torch's import (seconds)."""

import subprocess
import sys

HEAVY = ("torch", "numpy", "matplotlib", "diffusers", "modal", "trackio")


def modules_loaded_by(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_cli_app_imports_without_torch() -> None:
    assert modules_loaded_by("import zoo_cli.main") == []


def test_help_lists_every_command_without_torch() -> None:
    code = (
        "from typer.testing import CliRunner\n"
        "from zoo_cli.main import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "for name in ('train', 'sample', 'eval', 'bench-jvp', 'modal', 'sync', 'ckpts', 'clean'):\n"
        "    assert name in result.output, name\n"
    )
    assert modules_loaded_by(code) == []


def test_listing_local_runs_without_checkpoints_needs_no_torch(tmp_path) -> None:
    (tmp_path / "outputs").mkdir()
    code = (
        "from typer.testing import CliRunner\n"
        "from zoo_cli.main import app\n"
        "result = CliRunner().invoke(app, "
        f"['ckpts', '--local', '--outputs', {str(tmp_path / 'outputs')!r}])\n"
        "assert result.exit_code == 0, result.output\n"
    )
    assert modules_loaded_by(code) == []
