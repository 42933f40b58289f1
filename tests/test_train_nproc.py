"""`zoo train --nproc N` up to torchrun, and what each torchrun process does with a user error."""

import json
import os
import signal
from pathlib import Path

import torch
from typer.testing import CliRunner

from zoo import distributed
from zoo.config.loading import config_to_dict, load_config
from zoo_cli import distributed_entry
from zoo_cli import train as train_cli
from zoo_cli.main import app as zoo_app

runner = CliRunner()


def fake_torchrun(monkeypatch, returncode: int) -> list[dict]:
    launched: list[dict] = []

    class Torchrun:
        def __init__(self, command, env, start_new_session=False):
            config_path = Path(command[command.index("zoo_cli.distributed_entry") + 1])
            launched.append(
                {
                    "command": command,
                    "config_path": config_path,
                    "config": json.loads(config_path.read_text()),
                    "own_session": start_new_session,
                }
            )

        def wait(self) -> int:
            return returncode

    monkeypatch.setattr(train_cli.subprocess, "Popen", Torchrun)
    return launched


def test_a_batch_that_does_not_split_is_refused_before_torchrun(tmp_path, monkeypatch):
    launched = fake_torchrun(monkeypatch, 0)
    args = ["train", "moons", "train.batch_size=129", f"output_dir={tmp_path}", "--nproc", "2"]
    result = runner.invoke(zoo_app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and launched == []
    assert "error: train.batch_size=129 must be divisible by processes x grad_accum = 2 x 1 = 2" in text
    assert "use train.batch_size=128 or 130, or change --nproc or train.grad_accum" in text
    assert "Traceback" not in result.output


def test_the_config_file_for_torchrun_is_removed_after_it_returns(tmp_path, monkeypatch):
    launched = fake_torchrun(monkeypatch, 1)
    monkeypatch.setattr(distributed, "torchrun_has_shutdown_timeout", lambda: True)
    result = runner.invoke(
        zoo_app, ["train", "moons", f"output_dir={tmp_path}", "--run-name", "r2", "--nproc", "2"]
    )
    assert result.exit_code == 1
    (launch,) = launched
    assert launch["config"]["run_name"] == "r2" and not launch["config_path"].exists()
    # Stopping ranks get time to save their step (torchrun's own default SIGKILLs after 30 s), and
    # the terminal's Ctrl-C reaches the launcher alone, which passes it on once.
    assert "--shutdown_timeout=300" in launch["command"] and launch["own_session"]


def test_a_torchrun_without_the_stop_grace_is_said_at_launch(tmp_path, monkeypatch):
    """An older torchrun has no --shutdown_timeout: a stop then gets its fixed 30 s, which a
    slow step plus a large checkpoint can exceed, so the user is told before the run starts."""
    launched = fake_torchrun(monkeypatch, 0)
    monkeypatch.setattr(distributed, "torchrun_has_shutdown_timeout", lambda: False)
    monkeypatch.setattr(train_cli, "report_run", lambda run: None)
    result = runner.invoke(
        zoo_app, ["train", "moons", f"output_dir={tmp_path}", "--run-name", "r4", "--nproc", "2"]
    )
    assert result.exit_code == 0, result.output
    assert not any(part.startswith("--shutdown_timeout") for part in launched[0]["command"])
    text = " ".join(result.output.split())
    assert "torchrun has no --shutdown_timeout: a stopped run gets its fixed 30 s (not 300 s)" in text


def test_the_launcher_passes_a_signal_on_once_and_says_why_it_ignores_the_next(tmp_path, monkeypatch, capfd):
    """A second Ctrl-C passed on could cut the ranks' checkpoint short: it is ignored, and said so."""
    sent: list[int] = []

    class Torchrun:
        def __init__(self, command, env, start_new_session=False):
            pass

        def send_signal(self, signum):
            sent.append(signum)

        def wait(self) -> int:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            return 1

    monkeypatch.setattr(train_cli.subprocess, "Popen", Torchrun)
    monkeypatch.setattr(distributed, "torchrun_has_shutdown_timeout", lambda: True)
    result = runner.invoke(
        zoo_app, ["train", "moons", f"output_dir={tmp_path}", "--run-name", "r5", "--nproc", "2"]
    )
    assert result.exit_code == 128 + signal.SIGINT and sent == [signal.SIGINT]
    err = " ".join(capfd.readouterr().err.split())
    assert err.count("Ctrl-C again: ignored, so the ranks' checkpoint is written whole") == 1
    assert "torchrun kills them 300 s after the first signal at the latest" in err


def test_a_successful_launch_prints_the_runs_evaluation(tmp_path, monkeypatch):
    fake_torchrun(monkeypatch, 0)
    reported: list[Path] = []
    monkeypatch.setattr(train_cli, "report_run", lambda run: reported.append(run.root))
    result = runner.invoke(
        zoo_app, ["train", "moons", f"output_dir={tmp_path}", "--run-name", "r3", "--nproc", "2"]
    )
    assert result.exit_code == 0, result.output
    assert reported == [tmp_path / "r3"]


def test_torchrun_processes_report_a_user_error_in_one_line_from_rank_0(tmp_path, capsys, monkeypatch):
    cfg = load_config("moons", {"run_name": "missing", "output_dir": str(tmp_path)})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_to_dict(cfg)))
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert distributed_entry.main([str(config_path), "--resume"]) == 2  # every rank exits with the code
        err = capsys.readouterr().err
        assert (err.startswith("error:") and "missing" in err) == says and "Traceback" not in err, (rank, err)


def test_the_stop_grace_is_passed_only_to_a_torchrun_that_takes_it():
    from torch.distributed.run import get_args_parser

    from zoo.distributed import STOP_GRACE_S, torchrun_command

    takes_it = "shutdown_timeout" in vars(get_args_parser().parse_args(["script.py"]))
    # Known releases: the pinned torch's (2.14) torchrun takes it, 2.11's does not.
    known = {"2.14": True, "2.11": False}.get(".".join(torch.__version__.split(".")[:2]))
    if known is not None:
        assert takes_it is known, torch.__version__
    assert distributed.torchrun_has_shutdown_timeout() is takes_it
    command = torchrun_command(2, "zoo_cli.distributed_entry", ["cfg.json"])
    assert (f"--shutdown_timeout={STOP_GRACE_S}" in command) == takes_it
    assert command[-3:] == ["-m", "zoo_cli.distributed_entry", "cfg.json"]
