"""SIGTERM, Ctrl-C (SIGINT) and a hang-up (SIGHUP) during `zoo train`: a real process, a real signal.

It must stop after a whole step with a checkpoint of that step, mark the heartbeat, print one
line saying how to resume, and exit 128 + the signal; resuming then continues the run.  A stop
held for the step in progress is said at once, and a second Ctrl-C is acknowledged.  A resumed
run logs what an uninterrupted one would have: the same loss averages, the same evaluations.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from tiny_runs import TINY_RUN

from zoo.checkpoints import load_checkpoint, save_checkpoint
from zoo.config.loading import load_config
from zoo.runs import RunInterrupted
from zoo.training import trainer

ZOO = str(Path(sys.executable).parent / "zoo")
# Far more steps than it will run; checkpoints only at the end (so the one found after the
# signal was written by the stop); a heartbeat at every step (to know when it is training).
LONG_RUN = [
    "model.hidden=32",
    "model.depth=2",
    "train.batch_size=32",
    "train.log_every=1",
    "train.save_every=100000",
    "eval.n_samples=200",
    "eval.batch_size=200",
    "eval.meanflow_steps=[1]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]",
    "loss.jvp=nograd",
    "tracking.enabled=false",
    "experiment_log=",
    "--device",
    "cpu",
    "--threads",
    "1",
]


def start(workdir: Path, name: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.Popen(
        [ZOO, "train", "moons", *LONG_RUN, "--run-name", name, *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal, even when the tests run under `nohup` (zoo keeps an ignored signal ignored).
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )


def wait_for_step(heartbeat: Path, step: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if heartbeat.exists():
            try:
                if json.loads(heartbeat.read_text()).get("step", 0) >= step:
                    return
            except json.JSONDecodeError:
                pass  # never half-written (atomic), but be safe against a reader race
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no heartbeat at step {step} within {timeout} s")


STOP_SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)]


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory) -> dict[signal.Signals, tuple[Path, int, str]]:
    """One run per signal, started together (their start-ups overlap), each sent its signal once
    it has trained 3 steps: its folder (under its own working folder), exit code and stderr."""
    processes = {}
    for sig, _ in STOP_SIGNALS:
        workdir = tmp_path_factory.mktemp(sig.name)
        processes[sig] = workdir, start(workdir, "sig", "--steps", "100000")
    stopped = {}
    try:
        for sig, (workdir, process) in processes.items():
            wait_for_step(workdir / "outputs" / "sig" / "heartbeat.json", 3, process)
            process.send_signal(sig)
        for sig, (workdir, process) in processes.items():
            _, err = process.communicate(timeout=60)
            stopped[sig] = workdir, process.returncode, err
    finally:  # a run that failed to start or stop leaves no process behind
        for _, process in processes.values():
            if process.poll() is None:
                process.kill()
    return stopped


@pytest.mark.parametrize("sig, code", STOP_SIGNALS)
def test_a_signal_mid_run_saves_the_step_reached_and_says_how_to_resume(stopped_runs, sig, code):
    workdir, returncode, err = stopped_runs[sig]
    run_dir = workdir / "outputs" / "sig"
    assert returncode == code, err
    assert "Traceback" not in err
    heartbeat = json.loads((run_dir / "heartbeat.json").read_text())
    step = heartbeat["step"]
    assert heartbeat["status"] == "interrupted" and heartbeat["signal"] == sig.name and step >= 3
    # The checkpoint is of the step reached, written whole (no temporary file left) ...
    assert load_checkpoint(run_dir / "last.pt")["step"] == step == heartbeat["checkpoint_step"]
    assert not list(run_dir.glob(".*tmp*"))
    # ... and its logged records stop at that step.
    assert (
        max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()) == step
    )
    line = (
        f"interrupted by {sig.name} at step {step}, last checkpoint at step {step}; "
        "resume with `zoo train moons --run-name sig --resume`"
    )
    assert line in " ".join(err.split()), err
    if sig != signal.SIGTERM:
        return  # resuming is the same after any of them

    # The command it printed continues the run (to a few steps more), with the time curve going on.
    resumed = subprocess.run(
        [ZOO, "train", "moons", "--run-name", "sig", "--resume", "--steps", str(step + 3), "--threads", "1"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, step + 4))
    elapsed = [r["time/elapsed_s"] for r in train_records]
    assert all(b > a for a, b in zip(elapsed, elapsed[1:], strict=False)), elapsed
    final = json.loads((run_dir / "heartbeat.json").read_text())
    assert final["status"] == "finished" and final["step"] == step + 3


def test_sigterm_to_the_nproc_launcher_stops_every_rank_after_the_same_step(tmp_path):
    """`zoo train --nproc 2`: a SIGTERM aimed at the launcher alone (a scheduler, `timeout`) reaches
    both ranks through torchrun; they stop after one step, rank 0 saves it and says how to resume."""
    run_dir = tmp_path / "outputs" / "ddp"
    process = start(tmp_path, "ddp", "--steps", "100000", "--nproc", "2")
    wait_for_step(run_dir / "heartbeat.json", 3, process, timeout=180)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    heartbeat = json.loads((run_dir / "heartbeat.json").read_text())
    step = heartbeat["step"]
    assert heartbeat["status"] == "interrupted" and step >= 3
    assert load_checkpoint(run_dir / "last.pt")["step"] == step == heartbeat["checkpoint_step"]
    assert f"interrupted by SIGTERM at step {step}, last checkpoint at step {step}" in " ".join(err.split())


def test_an_ignored_signal_stays_ignored_and_handlers_are_restored():
    """A shell starts background jobs with SIGINT ignored; training must not take it back."""
    from zoo.interrupts import StopSignals

    before_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    before_term = signal.getsignal(signal.SIGTERM)
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not before_term  # zoo's handler
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is before_term
    finally:
        signal.signal(signal.SIGINT, before_int)


def test_under_torchrun_a_rank_stops_only_at_the_collective_check(monkeypatch):
    """Between steps a rank must not raise on its own: another rank holding the same signal inside
    its step would then wait for it in the next all-reduce."""
    from zoo import distributed
    from zoo.interrupts import StopRequested, StopSignals

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    asked = []
    monkeypatch.setattr(distributed, "max_across_ranks", lambda value, device: asked.append(value) or value)
    with StopSignals() as stops:
        os.kill(os.getpid(), signal.SIGTERM)  # outside held(): a single process would stop here
        time.sleep(0.05)
        assert stops.signum == signal.SIGTERM
        with pytest.raises(StopRequested):
            stops.check("cpu")
    assert asked == [signal.SIGTERM]


# --- in process: a real signal sent at a chosen point of a tiny run ----------------------------


def tiny_config(tmp_path: Path, name: str, *extra: str):
    return load_config(
        "moons",
        [
            *TINY_RUN,
            "tracking.enabled=false",
            f"run_name={name}",
            f"output_dir={tmp_path / 'outputs'}",
            *extra,
        ],
    )


def signal_during_step(monkeypatch, at_step: int, then=lambda: None) -> None:
    """SIGINT to this process while step `at_step` runs (inside StopSignals.held), then `then()`."""
    step = trainer.train_step

    def step_and_signal(state):
        metrics = step(state)
        if state.step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
            then()
        return metrics

    monkeypatch.setattr(trainer, "train_step", step_and_signal)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_bar_says_at_once_that_the_run_stops_after_the_step_and_acknowledges_a_second_ctrl_c(
    tmp_path, monkeypatch, capfd
):
    """The notice is drawn by the bar's own thread while the (here: slow) step is still running."""
    screen = io.StringIO()
    seen = []

    def look_twice():
        time.sleep(0.5)  # a long step: rich redraws about ten times a second meanwhile
        seen.append(" ".join(screen.getvalue().split()))
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        seen.append(" ".join(screen.getvalue().split()))

    signal_during_step(monkeypatch, 3, then=look_twice)
    terminal = Console(file=screen, force_terminal=True, color_system=None, width=250)
    with pytest.raises(RunInterrupted, match="interrupted by SIGINT at step 3, last checkpoint at step 3"):
        trainer.train_run(tiny_config(tmp_path, "bar", "train.steps=50"), console=terminal)
    assert "stopping after this step — saving a checkpoint" in seen[0] and "ignored" not in seen[0]
    assert (
        f"Ctrl-C again: ignored, so the checkpoint is written whole; `kill -9 {os.getpid()}` stops at once"
        in seen[1]
    )
    assert capfd.readouterr().err == ""  # the handler wrote nothing through the live bar
    assert load_checkpoint(tmp_path / "outputs" / "bar" / "last.pt")["step"] == 3


def test_without_a_terminal_a_held_stop_is_one_plain_line_at_once(tmp_path, monkeypatch, capfd):
    lines = []
    signal_during_step(monkeypatch, 3, then=lambda: lines.append(capfd.readouterr().err))
    with pytest.raises(RunInterrupted):
        trainer.train_run(tiny_config(tmp_path, "log", "train.steps=50"), console=Console(file=io.StringIO()))
    assert lines == ["stopping after this step — saving a checkpoint\n"]


@contextlib.contextmanager
def output_nobody_reads_from_step_2(monkeypatch) -> Iterator[Console]:
    """`zoo train ... 2>&1 | tee log` whose tee ends during step 2 (the Ctrl-C also reaches it, or
    it is closed by hand): the console and stderr become a pipe without a reader (EPIPE)."""
    read_end, write_end = os.pipe()
    stderr_fd = os.dup(2)
    os.dup2(write_end, 2)
    step = trainer.train_step

    def end_the_reader_then_step(state):
        if state.step == 2:
            os.close(read_end)
        return step(state)

    monkeypatch.setattr(trainer, "train_step", end_the_reader_then_step)
    stream = open(write_end, "w", closefd=False)  # like sys.stderr: buffered text on the pipe
    try:
        yield Console(file=stream)
    finally:
        with contextlib.suppress(BrokenPipeError):
            stream.close()  # what is left in its buffer has nowhere to go
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        os.close(write_end)


def test_output_nobody_can_read_does_not_cost_the_checkpoint(tmp_path, monkeypatch):
    """The held stop's notice and the bar's last drawing fail; the run still stops on a checkpoint."""
    with output_nobody_reads_from_step_2(monkeypatch) as console:
        signal_during_step(monkeypatch, 3)
        with pytest.raises(RunInterrupted, match="at step 3, last checkpoint at step 3"):
            trainer.train_run(tiny_config(tmp_path, "pipe", "train.steps=50"), console=console)
    assert load_checkpoint(tmp_path / "outputs" / "pipe" / "last.pt")["step"] == 3
    assert (
        json.loads((tmp_path / "outputs" / "pipe" / "heartbeat.json").read_text())["status"] == "interrupted"
    )


def test_output_nobody_can_read_does_not_fail_a_run_that_finishes(tmp_path, monkeypatch):
    """The bar is only a display: a run whose reader went away still writes its final records."""
    with output_nobody_reads_from_step_2(monkeypatch) as console:
        trainer.train_run(tiny_config(tmp_path, "done", "train.steps=5"), console=console)
    run_dir = tmp_path / "outputs" / "done"
    assert json.loads((run_dir / "heartbeat.json").read_text())["status"] == "finished"
    assert (run_dir / "eval.json").exists() and load_checkpoint(run_dir / "last.pt")["step"] == 5


def test_the_resume_line_nobody_can_read_keeps_the_exit_code(monkeypatch):
    """zoo train exits 128 + signal after a stop even when its last line cannot be written."""
    from zoo_cli import train as train_cli

    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = open(write_end, "w")
    try:
        monkeypatch.setattr(train_cli, "err_console", Console(file=stream))
        train_cli.report_interrupted(RunInterrupted("interrupted by SIGINT at step 3", signal.SIGINT))
    finally:
        with contextlib.suppress(BrokenPipeError):
            stream.close()


def test_a_run_resumed_between_two_log_steps_logs_the_loss_average_of_one_that_never_stopped(
    tmp_path, monkeypatch
):
    """train/loss_avg averages the losses since the last record: those before the stop count too."""
    trainer.train_run(tiny_config(tmp_path, "straight", "train.steps=15"))
    signal_during_step(monkeypatch, 7)  # records every 5 steps (TINY_RUN): two losses pending
    with pytest.raises(RunInterrupted):
        trainer.train_run(tiny_config(tmp_path, "split", "train.steps=15"))
    monkeypatch.undo()
    trainer.train_run(tiny_config(tmp_path, "split", "train.steps=15"), resume=True)

    def averages(name):
        return {
            r["step"]: r["train/loss_avg"]
            for r in records(tmp_path / "outputs" / name)
            if "train/loss_avg" in r
        }

    straight, split = averages("straight"), averages("split")
    assert sorted(straight) == sorted(split) == [5, 10, 15]
    for step in straight:
        assert split[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step


def test_a_checkpoint_without_a_loss_window_still_resumes(tmp_path, monkeypatch):
    """Checkpoints written before the window was stored: the resumed run starts an empty one."""
    signal_during_step(monkeypatch, 7)
    with pytest.raises(RunInterrupted):
        trainer.train_run(tiny_config(tmp_path, "old", "train.steps=10"))
    monkeypatch.undo()
    last = tmp_path / "outputs" / "old" / "last.pt"
    payload = load_checkpoint(last)
    del payload["loss_window"]
    save_checkpoint(last, payload)
    trainer.train_run(tiny_config(tmp_path, "old", "train.steps=10"), resume=True)
    assert [r["step"] for r in records(last.parent) if "train/loss_avg" in r] == [5, 10]


@pytest.mark.parametrize("during", ["the step", "its evaluation"])
def test_an_evaluation_step_stopped_before_its_evaluation_completed_is_evaluated_on_resume(
    tmp_path, monkeypatch, during
):
    """Stopped in step 5 (held: it stops after the step, before its evaluation) or in the middle of
    step 5's evaluation: the resumed run evaluates step 5 as the uninterrupted run did."""
    steps = ["train.steps=10", "train.eval_every=5"]
    trainer.train_run(tiny_config(tmp_path, "straight", *steps))
    if during == "the step":
        signal_during_step(monkeypatch, 5)
    else:
        evaluate = trainer.run_evaluation

        def interrupted_evaluation(state, run, final, progress):
            os.kill(os.getpid(), signal.SIGINT)  # not held: it stops here, at once
            return evaluate(state, run, final, progress)

        monkeypatch.setattr(trainer, "run_evaluation", interrupted_evaluation)
    with pytest.raises(RunInterrupted, match="at step 5, last checkpoint at step 5"):
        trainer.train_run(tiny_config(tmp_path, "split", *steps))
    monkeypatch.undo()
    trainer.train_run(tiny_config(tmp_path, "split", *steps), resume=True)

    def evaluations(name):
        return [(r["step"], r) for r in records(tmp_path / "outputs" / name) if "eval/energy_meanflow_1" in r]

    straight, split = evaluations("straight"), evaluations("split")
    assert [s for s, _ in split] == [s for s, _ in straight] == [5, 10]
    for (_, a), (_, b) in zip(straight, split, strict=True):
        assert b["eval/energy_meanflow_1"] == pytest.approx(a["eval/energy_meanflow_1"], rel=1e-6, abs=1e-9)
    assert (tmp_path / "outputs" / "split" / "samples" / "step_0000005.png").exists()


def test_an_evaluation_that_completed_is_not_repeated_on_resume(tmp_path):
    """A finished run continued past its last step: that step's final evaluation counts."""
    trainer.train_run(tiny_config(tmp_path, "more", "train.steps=5", "train.eval_every=5"))
    trainer.train_run(tiny_config(tmp_path, "more", "train.steps=10", "train.eval_every=5"), resume=True)
    evaluated = [r["step"] for r in records(tmp_path / "outputs" / "more") if "eval/energy_meanflow_1" in r]
    assert evaluated == [5, 10]
