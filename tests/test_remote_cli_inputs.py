"""Run-management commands without Modal credentials: local input is judged before the token,
listings say what they left out, names stay whole in tables, a missing --outputs is an error."""

import os
import subprocess
import sys

import pytest
from rich.console import Console
from test_remote_fixtures import REPO, offline_modal, write_run
from typer.testing import CliRunner

from zoo.remote.listing import list_local_runs
from zoo_cli.main import app
from zoo_cli.runs_cmds import checkpoints_table

runner = CliRunner()
LONG_NAME = "fashion-mnist-20250101-120000-ratio0.75-a-long-descriptive-run-name"


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def no_modal(tmp_path, monkeypatch):
    """No token anywhere, and a Modal server that refuses connections (nothing reaches the network)."""
    offline_modal(tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "args, message, train_too",
    [
        (["mooons"], "unknown preset 'mooons'", True),
        (["moons", "loss.raito=1"], "loss.raito: unknown key", True),
        (["moons", "loss.ratio=7"], "loss.ratio", True),
        (["moons", "loss.jvp=selective"], "one of the benchmark's modes", True),
        (["moons", "--gpu", "B300:99"], "unknown GPU 'B300:99'", False),
        (["moons", "--gpu", "H100:99"], "GPU count", False),
        (["moons", "--timeout", "48h"], "--timeout must lie between 1m and 24h", False),
        (["moons", "--retries", "-1"], "--retries must lie between 0 and 10", False),
        (["moons", "--run-name", "bad/name"], "run name 'bad/name' is not valid", False),
        (
            ["moons", "train.batch_size=256", "--gpu", "H100:3"],
            "train.batch_size=256 must be divisible",
            False,
        ),
        (["--resume"], "--resume needs --run-name", False),
        ([], "give a preset", False),
    ],
)
def test_submit_judges_local_input_before_asking_for_a_token(args, message, train_too):
    result = runner.invoke(app, ["modal", "submit", *args])
    assert result.exit_code == 2, result.output
    assert message in flat(result.output) and "Modal token" not in result.output
    if train_too:  # the very error `zoo train` gives for the same preset and overrides
        trained = runner.invoke(app, ["train", *args])
        assert trained.exit_code == 2 and message in flat(trained.output)


def test_submit_with_good_input_still_needs_the_token():
    result = runner.invoke(
        app, ["modal", "submit", "moons", "--gpu", "H100", "--timeout", "2h", "--retries", "1"]
    )
    assert result.exit_code == 1 and "no Modal token configured" in flat(result.output)


def test_ckpts_without_a_token_says_remote_runs_were_not_listed(tmp_path):
    write_run(tmp_path / "outputs", "here", archived=[], last_step=5)
    result = runner.invoke(app, ["ckpts"])
    assert result.exit_code == 0, result.output
    assert "remote runs not listed: no Modal token configured" in flat(result.output)
    assert "modal setup" in result.output and "here" in result.output
    local = runner.invoke(app, ["ckpts", "--local"])  # asked for local runs only: nothing left out
    assert local.exit_code == 0 and "not listed" not in local.output and "here" in local.output
    (tmp_path / ".modal.toml").write_text("this is [not toml")
    broken = runner.invoke(app, ["ckpts"])
    assert broken.exit_code == 0 and "here" in broken.output
    assert "remote runs not listed:" in flat(broken.output) and "is not valid TOML" in flat(broken.output)


def test_clean_in_a_missing_outputs_folder_is_an_error(tmp_path):
    result = runner.invoke(app, ["clean", "m1", "--outputs", str(tmp_path / "nonexistent")])
    assert result.exit_code == 2
    assert f"--outputs {tmp_path / 'nonexistent'} is not a folder" in flat(result.output)
    assert not (tmp_path / "nonexistent").exists()


def test_piped_ckpts_keeps_every_name_whole_on_its_line(tmp_path):
    write_run(tmp_path / "outputs", LONG_NAME, archived=[10], last_step=20)
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from zoo_cli.main import app; app()",
            "ckpts",
            "--local",
            "--outputs",
            "outputs",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert any(LONG_NAME in line and "last.pt" in line for line in lines), done.stdout
    assert any("step_0000010.pt" in line for line in lines) and "…" not in done.stdout


def test_in_an_80_column_terminal_names_fold_instead_of_being_cut(tmp_path):
    write_run(tmp_path / "outputs", LONG_NAME, archived=[10], last_step=20)
    console = Console(width=80, force_terminal=True, record=True)
    console.print(checkpoints_table(list_local_runs(tmp_path / "outputs"), now=0.0))
    text = console.export_text()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") > 2)
    assert LONG_NAME in first_column
