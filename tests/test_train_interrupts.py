"""SIGTERM and Ctrl-C (SIGINT) during `zoo train`: a real process, a real signal mid-run.

It must stop after a whole step with a checkpoint of that step, mark the heartbeat, print one
line saying how to resume, and exit 128 + the signal; resuming then continues the run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoo.checkpoints import load_checkpoint

ZOO = str(Path(sys.executable).parent / "zoo")
# Far more steps than it will run; checkpoints only at the end (so the one found after the
# signal was written by the stop); a heartbeat at every step (to know when it is training).
LONG_RUN = [
    "model.hidden=32", "model.depth=2", "train.batch_size=32", "train.log_every=1", "train.save_every=100000",
    "eval.n_samples=200", "eval.batch_size=200", "eval.meanflow_steps=[1]", 'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]", "loss.jvp=nograd", "tracking.enabled=false", "experiment_log=",
    "--device", "cpu", "--threads", "1",
]


def start(workdir: Path, name: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.Popen(
        [ZOO, "train", "moons", *LONG_RUN, "--run-name", name, *args],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_saves_the_step_reached_and_says_how_to_resume(tmp_path, sig, code):
    run_dir = tmp_path / "outputs" / "sig"
    process = start(tmp_path, "sig", "--steps", "100000")
    wait_for_step(run_dir / "heartbeat.json", 3, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err
    heartbeat = json.loads((run_dir / "heartbeat.json").read_text())
    step = heartbeat["step"]
    assert heartbeat["status"] == "interrupted" and heartbeat["signal"] == sig.name and step >= 3
    # The checkpoint is of the step reached, written whole (no temporary file left) ...
    assert load_checkpoint(run_dir / "last.pt")["step"] == step == heartbeat["checkpoint_step"]
    assert not list(run_dir.glob(".*tmp*"))
    # ... and its logged records stop at that step.
    assert max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()) == step
    line = (
        f"interrupted by {sig.name} at step {step}, last checkpoint at step {step}; "
        "resume with `zoo train moons --run-name sig --resume`"
    )
    assert line in " ".join(err.split()), err
    if sig == signal.SIGINT:
        return  # resuming is the same after either signal

    # The command it printed continues the run (to a few steps more), with the time curve going on.
    resumed = subprocess.run(
        [ZOO, "train", "moons", "--run-name", "sig", "--resume", "--steps", str(step + 3), "--threads", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
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
    from zoo.training.interrupts import StopSignals

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
    from zoo.training import distributed
    from zoo.training.interrupts import StopRequested, StopSignals

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
