"""A run folder has one writer, survives damaged files, and never keeps a diverged state.

One small run is trained once per module; each test works on its own copy of it.
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_crash_safety import DiskFull
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo import runs as run_files
from zoo.checkpoints import load_checkpoint, save_checkpoint
from zoo.config.loading import load_config
from zoo.environment import SUBMISSION_ENV
from zoo.runs import DivergedError, RunBusyError, RunDir, RunLock, lock_path
from zoo.training import trainer
from zoo_cli.main import app

runner = CliRunner()
QUIET = ["tracking.enabled=false", "--threads", "1"]


def zoo(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 20-step run with checkpoints at 10 and 20 (step_10 is the one clean may delete)."""
    root = tmp_path_factory.mktemp("trained")
    overrides = ["train.steps=20", "train.archive_every=10", "tracking.enabled=false", "run_name=r"]
    trainer.train_run(load_config("moons", [*TINY_RUN, *overrides, f"output_dir={root}"]))
    return root / "r"


def quiet_for_an_hour(run: RunDir) -> None:
    """No file of the run written for an hour (a long step): --live-window sees no recent change."""
    past = time.time() - 3600
    for path in run.root.rglob("*"):
        os.utime(path, (past, past))


@pytest.fixture
def run(trained, tmp_path) -> RunDir:
    shutil.copytree(trained, tmp_path / "r")
    return RunDir(tmp_path / "r")


def clean(run: RunDir, *extra: str):
    return zoo("clean", run.name, "--outputs", run.root.parent, "--yes", "--live-window", "1s", *extra)


def test_a_locked_run_refuses_a_second_writer_and_is_left_alone_by_clean(run):
    common = [*TINY_RUN, *QUIET, f"output_dir={run.root.parent}", "--run-name", "r"]
    with RunLock(run):
        for extra in ([], ["--resume", "--steps", "30"]):
            result = zoo("train", "moons", *common, *extra)
            assert result.exit_code == 2, result.output
            [line] = error_lines(result.output)
            assert f"being trained by process {os.getpid()}" in line
        result = clean(run)
        assert result.exit_code == 0 and "skipping r: being trained by process" in result.output
        assert run.archive(10).exists()
    # Released (as at any exit of its process): clean goes ahead.
    result = clean(run)
    assert result.exit_code == 0, result.output
    assert not run.archive(10).exists() and run.archive(20).exists() and run.last.exists()


def test_a_locked_run_on_the_volume_layout_is_left_alone_by_clean(trained, tmp_path):
    volume = tmp_path / "volume"
    shutil.copytree(trained, volume / "outputs" / "r")
    run = RunDir(volume / "outputs" / "r")
    quiet_for_an_hour(run)
    remote = ["clean", "r", "--remote", "--volume-dir", volume, "--yes", "--live-window", "1s"]
    with RunLock(run):
        result = zoo(*remote)
        assert result.exit_code == 0 and "skipping r: being trained by process" in result.output, (
            result.output
        )
        assert run.archive(10).exists()
    assert zoo(*remote).exit_code == 0 and not run.archive(10).exists() and run.archive(20).exists()


class Enough(Exception):
    """Ends the first start once the second has been tried (training it would prove nothing more)."""


def test_a_second_start_is_refused_before_it_builds_anything_and_writes_nothing(tmp_path, monkeypatch):
    """The first start holds the run's lock from its first check: a second start of the run, while
    the first is still building (data, model, feature network: minutes on a real run), is refused
    at once, and neither the refusal nor the first start's build has written the run folder."""
    args = [*TINY_RUN, "tracking.enabled=false", "threads=1", "run_name=c", f"output_dir={tmp_path}"]
    builds, refusals = [], []

    def build_state(cfg, *rest, **kwargs):
        builds.append(cfg.run_name)
        if len(builds) == 1:  # the first start is building: start the run twice more
            common = [*TINY_RUN, *QUIET, f"output_dir={tmp_path}", "--run-name", "c", "--steps", "2"]
            refusals.append(zoo("train", "moons", *common))
            with pytest.raises(RunBusyError) as error:  # past the CLI's check, as in a race
                trainer.train_run(load_config("moons", [*args, "train.steps=2"]))
            refusals.append(str(error.value))
            assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock"]
        raise Enough

    monkeypatch.setattr(trainer, "build_state", build_state)
    with pytest.raises(Enough):
        trainer.train_run(load_config("moons", [*args, "train.steps=2"]))
    cli, direct = refusals
    assert cli.exit_code == 2, cli.output
    [line] = error_lines(cli.output)
    assert f"run 'c' is being trained by process {os.getpid()}" in line
    assert f"being trained by process {os.getpid()}" in direct
    assert builds == ["c"]  # only the start that holds the lock built anything
    # Its lock went with it, and its failed start wrote nothing.
    assert not any(tmp_path.iterdir())


def test_without_file_locks_a_run_goes_unlocked_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_files.fcntl, "flock", no_locks)
    run = RunDir(tmp_path / "outputs" / "u")
    with RunLock(run):
        pass
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "has no file locks" in err and "second process" in err and "'u'" in err
    assert not (tmp_path / "outputs").exists(), "the folders made for the lock file are removed"
    # A remote attempt says nothing: there its submission record keeps the run to one writer.
    monkeypatch.setenv(SUBMISSION_ENV, "0123abcd")
    with RunLock(run):
        pass
    assert capsys.readouterr().err == ""


def test_a_start_without_locks_leaves_the_lock_file_of_a_holder(tmp_path, monkeypatch, capsys):
    """A start whose flock fails for want of locks (not because the lock is busy) goes unlocked, but
    the lock file it found is a holder's: removing it would let a third start lock a new file while
    the holder still trains."""
    monkeypatch.setattr(run_files, "LOCK_RETRY_S", 0)
    run = RunDir(tmp_path / "u")
    with RunLock(run) as holder:
        held = os.stat(lock_path(run)).st_ino
        with monkeypatch.context() as patch:

            def no_locks(fd, operation):
                raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

            patch.setattr(run_files.fcntl, "flock", no_locks)
            with RunLock(run):
                pass
        assert "has no file locks" in capsys.readouterr().err
        assert os.stat(lock_path(run)).st_ino == held
        with pytest.raises(RunBusyError, match=f"process {os.getpid()}"):
            RunLock(run).__enter__()
        assert holder.fd is not None
    assert not lock_path(run).exists()


def test_a_holder_leaves_a_lock_file_that_replaced_its_own(tmp_path, monkeypatch):
    """Its lock file removed under it (a user's rm), a holder's exit must not remove the file that a
    later start locked in its place: that start still trains, and a third must be refused."""
    monkeypatch.setattr(run_files, "LOCK_RETRY_S", 0)
    run = RunDir(tmp_path / "u")
    first = RunLock(run).__enter__()
    lock_path(run).unlink()
    with RunLock(run):
        second = os.stat(lock_path(run)).st_ino
        first.__exit__(None, None, None)
        assert os.stat(lock_path(run)).st_ino == second
        with pytest.raises(RunBusyError):
            RunLock(run).__enter__()
    assert not lock_path(run).exists()


def test_a_checkpoint_replaced_while_a_resume_starts_fails_it_with_exit_1(run, monkeypatch):
    """Another writer's save between the resume's read of last.pt and its taking the run (possible
    only without file locks) is a race, not a command to change: exit 1, and the run is untouched."""
    restore = trainer.restore_from_last

    def restore_then_replaced(state, run_dir, device):
        result = restore(state, run_dir, device)
        copy = run_dir.root / "copy.pt"
        shutil.copy2(run_dir.last, copy)
        os.replace(copy, run_dir.last)  # a new file in its place, as another process's save leaves
        return result

    monkeypatch.setattr(trainer, "restore_from_last", restore_then_replaced)
    heartbeat = run.heartbeat.read_bytes()
    common = [*TINY_RUN, *QUIET, f"output_dir={run.root.parent}", "--run-name", "r"]
    result = zoo("train", "moons", *common, "--resume", "--steps", "30")
    assert result.exit_code == 1 and not isinstance(result.exception, Exception), result.output
    [line] = error_lines(result.output)
    assert "last.pt was replaced while this resume started" in line and "resume again" in line
    assert run.heartbeat.read_bytes() == heartbeat


def killed_holder(run: RunDir) -> int:
    """A process that took the run's lock and wrote a running heartbeat, then was SIGKILLed."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from zoo.runs import RunDir, RunLock\n"
        "run = RunDir(Path(sys.argv[1]))\n"
        "lock = RunLock(run).__enter__()\n"
        "run.write_heartbeat(status='running', step=20, loss=0.5)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(run.root)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout.readline() == "ready\n"
    process.kill()
    process.wait()
    return process.pid


def test_a_killed_run_is_listed_dead_not_running_and_clean_may_go_ahead(run):
    pid = killed_holder(run)
    assert lock_path(run).exists(), "SIGKILL leaves the lock file, held by nobody"

    def listed() -> dict:
        result = zoo("ckpts", "--local", "--outputs", run.root.parent, "--json")
        assert result.exit_code == 0, result.output
        [info] = json.loads(result.output)  # the lock file beside the run is no run
        return info

    info = listed()
    assert info["state"] == "dead" and f"process {pid} is gone" in info["detail"], info
    assert "--resume" in info["detail"]
    # The table says it too, in a line under it: the status column alone does not say what to do.
    table = zoo("ckpts", "--local", "--outputs", run.root.parent)
    assert table.exit_code == 0, table.output
    [note] = [line for line in table.output.splitlines() if line.startswith("r is dead: ")]
    assert note == f"r is dead: {info['detail']}"
    # Even if its process id now named a live process (reused), nobody holds the lock: dead.
    beat = json.loads(run.heartbeat.read_text())
    run.heartbeat.write_text(json.dumps({**beat, "pid": os.getpid()}))
    assert listed()["state"] == "dead"
    with RunLock(run):  # a live holder: running, and left alone by clean
        assert listed()["state"] == "running"
        assert "being trained by process" in zoo("clean", "r", "--outputs", run.root.parent, "--yes").output
    lock_path(run).touch()  # as a killed holder leaves it
    # The heartbeat is seconds old and the files just written, yet nothing writes the run.
    result = zoo("clean", "r", "--outputs", run.root.parent, "--yes")
    assert result.exit_code == 0 and not run.archive(10).exists(), result.output
    assert run.archive(20).exists() and run.last.exists()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_running_heartbeat_of_a_live_process_protects_the_run_whatever_the_window(run):
    beat = json.loads(run.heartbeat.read_text())
    # Last written an hour ago (a slow step), by a process that is alive: left alone.
    beat.update(status="running", pid=os.getpid(), host=socket.gethostname(), updated=beat["updated"] - 3600)
    run.heartbeat.write_text(json.dumps(beat))
    quiet_for_an_hour(run)
    result = clean(run)
    assert result.exit_code == 0 and "being trained by process" in result.output, result.output
    assert run.archive(10).exists()
    # The same heartbeat from a process that has died: cleaned.
    beat["pid"] = dead_pid()
    run.heartbeat.write_text(json.dumps(beat))
    quiet_for_an_hour(run)
    result = clean(run)
    assert result.exit_code == 0 and not run.archive(10).exists(), result.output
    assert run.archive(20).exists()


def poison_gradient_at(monkeypatch, step: int) -> None:
    """An inf in the gradient of the step after `step` (as a far too large learning rate gives)."""
    real = trainer.micro_batch_backward

    def backward(state):
        metrics = real(state)
        if state.step == step:
            next(state.model.parameters()).grad.view(-1)[0] = float("inf")
        return metrics

    monkeypatch.setattr(trainer, "micro_batch_backward", backward)


def test_divergence_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_gradient_at(monkeypatch, 12)
    result = zoo(
        "train", "moons", *TINY_RUN, *QUIET, "--steps", "20", f"output_dir={tmp_path}", "--run-name", "d"
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = error_lines(result.output)
    assert "training diverged at step 13" in line and "last checkpoint (step 10) is intact" in line
    run = RunDir(tmp_path / "d")
    payload = load_checkpoint(run.last)
    assert payload["step"] == 10
    assert all(t.isfinite().all() for t in [*payload["model"].values(), *payload["ema"].values()])
    heartbeat = json.loads(run.heartbeat.read_text())
    assert heartbeat["status"] == "failed" and "diverged at step 13" in heartbeat["error"]
    assert max(r["step"] for r in run.read_metrics()) == 10


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    real = trainer.train_step

    def step(state):
        metrics = real(state)
        if state.step == 10:
            next(state.ema.model.parameters()).data.view(-1)[0] = float("nan")
        return metrics

    monkeypatch.setattr(trainer, "train_step", step)
    cfg = load_config(
        "moons",
        [*TINY_RUN, "train.steps=20", "tracking.enabled=false", "run_name=w", f"output_dir={tmp_path}"],
    )
    with pytest.raises(
        DivergedError, match="weights became non-finite by step 10; not saving them, no checkpoint"
    ):
        trainer.train_run(cfg)
    assert not (tmp_path / "w" / "last.pt").exists()


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_eval_and_sample_refuse_a_checkpoint_with_non_finite_weights(run, tmp_path, command):
    payload = load_checkpoint(run.last)
    next(iter(payload["ema"].values())).view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "bad.pt", payload)
    result = zoo(command, tmp_path / "bad.pt", "--device", "cpu")
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "holds non-finite ema weights" in line and "diverged" in line


DAMAGE = {
    "garbage heartbeat": ("heartbeat.json", b"{not json"),
    "empty heartbeat": ("heartbeat.json", b""),
    "list heartbeat": ("heartbeat.json", b"[1, 2]"),
    "non-UTF-8 heartbeat": ("heartbeat.json", b"\xff\xfe\x00"),
    "garbage eval.json": ("eval.json", b"\x00garbage"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_run_files_are_named_not_tracebacks(run, case):
    name, content = DAMAGE[case]
    (run.root / name).write_bytes(content)
    listed = zoo("ckpts", "--local", "--outputs", run.root.parent, "--json")
    assert listed.exit_code == 0, listed.output
    [info] = json.loads(listed.output)
    assert info["run"] == "r" and {c["name"] for c in info["checkpoints"]} >= {"last.pt", "step_0000010.pt"}
    if name == "heartbeat.json":
        assert info["state"] == "unknown" and "heartbeat.json is damaged" in info["detail"]
    cleaned = clean(run)
    assert cleaned.exit_code == 0, cleaned.output
    assert f"skipping r: {name} cannot be read" in cleaned.output
    assert run.archive(10).exists()


def test_resume_over_a_damaged_heartbeat_and_non_utf8_metrics(run):
    run.heartbeat.write_bytes(b"[1, 2]")
    with open(run.metrics, "ab") as handle:
        handle.write(b"\xff\xfe not a record\n")
    result = zoo(
        "train",
        "moons",
        *QUIET,
        f"output_dir={run.root.parent}",
        "--run-name",
        "r",
        "--resume",
        "--steps",
        "22",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(run.heartbeat.read_text())["status"] == "finished"
    assert [r["step"] for r in run.read_metrics() if "train/loss" in r][-2:] == [20, 22]


def test_a_checkpoint_with_flipped_bytes_and_no_sidecar_is_marked_and_refused(run):
    data = bytearray(run.last.read_bytes())
    weights = load_checkpoint(run.last)["model"]
    tensor = max(weights.values(), key=lambda t: t.numel())
    data[data.find(tensor.numpy().tobytes()) + 7] ^= 0x10
    run.last.write_bytes(bytes(data))
    run.root.joinpath("last.pt.sha256").unlink()
    listed = zoo("ckpts", "--local", "--outputs", run.root.parent, "--json")
    [info] = json.loads(listed.output)
    marks = {c["name"]: c["damaged"] for c in info["checkpoints"]}
    assert "fails its CRC check" in marks["last.pt"] and marks["step_0000020.pt"] is None
    result = zoo(
        "train",
        "moons",
        *QUIET,
        f"output_dir={run.root.parent}",
        "--run-name",
        "r",
        "--resume",
        "--steps",
        "30",
    )
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert "last.pt is damaged (its record" in line and "step_*.pt" in line


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_one_flag(tmp_path):
    common = [*TINY_RUN, *QUIET, f"output_dir={tmp_path}", "--run-name", "e", "--steps", "5"]
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "config.toml").write_text("# a run killed during its first steps\n")
    (folder / "heartbeat.json").write_text('{"status": "running", "updated": 0}')
    refused = zoo("train", "moons", *common)
    assert refused.exit_code == 2 and "pass --restart to start it afresh" in refused.output
    with RunLock(RunDir(folder)):
        busy = zoo("train", "moons", *common, "--restart")
        assert busy.exit_code == 2 and "being trained by process" in busy.output
    result = zoo("train", "moons", *common, "--restart")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(folder / "last.pt")["step"] == 5
    again = zoo("train", "moons", *common, "--restart")
    assert again.exit_code == 2 and "only a run without checkpoints" in again.output
    assert "--restart" in zoo("train", "--help").output


def test_a_full_disk_fails_the_run_in_one_line_with_the_cause_in_its_heartbeat(tmp_path, monkeypatch):
    from zoo import runs as run_files

    disk_full = DiskFull(open)
    saves = []

    def full_from_the_second_save(file, mode="r", *args, **kwargs):
        if ".last.pt.tmp-" in str(file):
            saves.append(file)
        if len(saves) >= 2:
            return disk_full(file, mode, *args, **kwargs)
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(run_files, "open", full_from_the_second_save, raising=False)
    result = zoo(
        "train", "moons", *TINY_RUN, *QUIET, "--steps", "20", f"output_dir={tmp_path}", "--run-name", "f"
    )
    monkeypatch.undo()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = error_lines(result.output)
    assert "could not write checkpoint" in line and "No space left on device" in line
    run = RunDir(tmp_path / "f")
    assert not list(run.root.glob(".*.tmp-*")), "no partial file is left"
    assert load_checkpoint(run.last)["step"] == 10
    heartbeat = json.loads(run.heartbeat.read_text())
    assert heartbeat["status"] == "failed" and "No space left on device" in heartbeat["error"]
