"""The container side: which run an attempt trains, and how failures reach the heartbeat.

`supervise` runs here on a plain directory playing the Volume; its training process is a
real child process whose `train_run` fails in chosen ways (out of memory, I/O, SIGKILL).
"""

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from zoo import distributed
from zoo.checkpoints import save_checkpoint
from zoo.config.loading import config_to_dict, load_config
from zoo.remote.status import run_status
from zoo.remote.worker import (
    LOADER_KILLED_HINT,
    OOM_HINT,
    SIGKILL_HINT,
    RemoteTrainingError,
    RunPaths,
    collect_failure,
    describe_exception,
    is_retryable,
    plan_attempt,
    read_attempts,
    snapshot_trackio,
    supervise,
)
from zoo.runs import SUBMISSION_ENV, RunDir, RunError

CHILD = """
import os, signal, sys
from pathlib import Path
import torch
from zoo.remote import worker
from zoo.runs import RunDir

config, failures, mode = sys.argv[1:4]

def fake_train(cfg, resume, command):
    run = RunDir(Path(cfg.output_dir) / cfg.run_name)
    run.write_heartbeat(status="running", step=3, loss=0.5)
    print(f"training {cfg.run_name} resume={resume}", flush=True)
    if mode == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    if mode == "io":
        raise OSError("connection reset by peer")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    run.write_heartbeat(status="finished", step=5, loss=0.1)

sys.exit(worker.main(["--config", config, "--failure-dir", failures], train=fake_train))
"""


def setup_run(volume: Path, run: str = "r1", submission_id: str = "sub-1", retries: int = 2) -> dict:
    cfg = load_config("moons", [f"run_name={run}", f"output_dir={volume / 'outputs'}", "device=cpu"])
    registry = volume / "remote" / run
    registry.mkdir(parents=True)
    (registry / "submission.json").write_text(
        json.dumps({"submission_id": submission_id, "retries": retries})
    )
    return config_to_dict(cfg)


def run_fake(volume: Path, tmp_path: Path, mode: str, config: dict, submission_id: str = "sub-1"):
    work = tmp_path / f"work-{mode}"
    work.mkdir()
    child = [
        sys.executable,
        "-c",
        CHILD,
        str(work / "config.json"),
        str(volume / "remote" / config["run_name"]),
        mode,
    ]
    commits = []
    outcome = supervise(
        volume,
        config,
        submission_id,
        resume=False,
        nproc=1,
        commit=lambda: commits.append(1),
        work_dir=work,
        child_command=child,
    )
    return outcome, commits


def heartbeat(volume: Path, run: str = "r1") -> dict:
    return json.loads((volume / "outputs" / run / "heartbeat.json").read_text())


def test_out_of_memory_is_a_failure_with_its_cause_and_no_retry(tmp_path):
    volume = tmp_path / "volume"
    config = setup_run(volume)
    outcome, commits = run_fake(volume, tmp_path, "oom", config)
    assert outcome["status"] == "failed" and "OutOfMemoryError: CUDA out of memory" in outcome["error"]
    beat = heartbeat(volume)
    assert beat["status"] == "failed" and beat["error"].endswith(OOM_HINT) and beat["retrying"] is False
    assert beat["submission_id"] == "sub-1"  # whose attempt this was, for status after a resume
    status = run_status(beat, beat["updated"] + 10 * 3600)  # hours later: still failed, never "stalled"
    assert status.state == "failed" and "CUDA out of memory" in status.detail
    attempts = read_attempts(RunPaths(volume, "r1"))
    assert [a["event"] for a in attempts] == ["start", "end"] and attempts[1]["retryable"] is False
    assert commits, "the volume is committed before returning"
    log = (volume / "remote" / "r1" / "train.log").read_text()
    assert "training r1 resume=False" in log and "OutOfMemoryError" in log


def test_a_sigkilled_training_process_is_reported_by_the_supervisor(tmp_path):
    volume = tmp_path / "volume"
    config = setup_run(volume)
    outcome, _ = run_fake(volume, tmp_path, "kill", config)
    assert outcome["status"] == "failed" and outcome["error"] == f"training process {SIGKILL_HINT}"
    assert heartbeat(volume)["status"] == "failed" and "out of host memory" in heartbeat(volume)["error"]


FAKE_RANKS = """
import os, signal, sys
from pathlib import Path
import torch.distributed as dist
from zoo.remote import worker
from zoo.runs import RunDir

def fake_train(cfg, resume, command):
    if dist.get_rank() == 0:
        RunDir(Path(cfg.output_dir) / cfg.run_name).write_heartbeat(status="running", step=3, loss=0.5)
    dist.barrier()  # both ranks train
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # what the host's OOM killer does
    dist.barrier()  # rank 0 waits in a collective for its lost peer

sys.exit(worker.main(sys.argv[1:], train=fake_train))
"""


def test_a_rank_killed_under_torchrun_is_reported_as_out_of_host_memory(tmp_path, monkeypatch):
    """torchrun exits 1 for a SIGKILLed rank, as for any crash: the launcher's record names the kill."""
    volume = tmp_path / "volume"
    config = setup_run(volume, retries=3)
    (tmp_path / "fake_ranks.py").write_text(FAKE_RANKS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    paths = RunPaths(volume, "r1")
    work = tmp_path / "work"
    work.mkdir()
    args = ["--config", str(work / "config.json"), "--failure-dir", str(paths.registry)]
    child = distributed.torchrun_command(2, "fake_ranks", args, failures_file=paths.launch_failures)
    outcome = supervise(
        volume, config, "sub-1", False, 2, commit=lambda: None, work_dir=work, child_command=child
    )

    assert outcome["status"] == "failed", "no retry: the next attempt would run out of memory again"
    assert outcome["error"] == f"rank 1 {SIGKILL_HINT}"
    # rank 0 may fail too (its collective lost the peer) before torchrun stops it: a consequence
    killed = {f["rank"]: f for f in json.loads(paths.launch_failures.read_text())["failures"]}[1]
    assert (killed["exitcode"], killed["signal"]) == (-9, "SIGKILL")
    beat = heartbeat(volume)
    assert beat["status"] == "failed" and beat["retrying"] is False
    status = run_status(beat, beat["updated"] + 10 * 3600)  # hours later: failed with the cause, not stalled
    assert (
        status.state == "failed"
        and "rank 1 killed by SIGKILL" in status.detail
        and "host memory" in status.detail
    )
    assert "ChildFailedError" in (volume / "remote" / "r1" / "train.log").read_text()  # torchrun's summary


@pytest.mark.parametrize(
    "launched, returncode, error, retryable",
    [
        (None, 137, f"training process {SIGKILL_HINT}", False),  # SIGKILL as a shell reports it
        ([{"rank": 3, "exitcode": -11, "signal": "SIGSEGV"}], 1, "rank 3 killed by SIGSEGV", True),
        ([{"rank": 0, "exitcode": 1, "signal": None}], 1, "RuntimeError: gloo lost its peer", True),
    ],
)
def test_failure_causes(tmp_path, launched, returncode, error, retryable):
    paths = RunPaths(tmp_path, "r1")
    paths.registry.mkdir(parents=True)
    if launched is not None:
        paths.launch_failures.write_text(
            json.dumps({"failures": launched, "first_rank": launched[0]["rank"]})
        )
    report = {"rank": 0, "error": "RuntimeError: gloo lost its peer", "retryable": True}
    (paths.registry / "failure-rank0.json").write_text(json.dumps(report))
    failure = collect_failure(paths, returncode)
    assert (failure.error, failure.retryable) == (error, retryable)


def test_other_errors_are_raised_for_modal_to_retry(tmp_path):
    volume = tmp_path / "volume"
    config = setup_run(volume, retries=2)
    with pytest.raises(RemoteTrainingError, match="connection reset"):
        run_fake(volume, tmp_path, "io", config)
    beat = heartbeat(volume)
    assert beat["status"] == "failed" and beat["retrying"] is True and beat["attempt"] == 1
    assert "Modal retries it" in run_status(beat, beat["updated"]).detail


def test_an_attempt_never_trains_another_submissions_run(tmp_path):
    volume = tmp_path / "volume"
    config = setup_run(volume, submission_id="owner")
    with pytest.raises(RunError, match="belongs to another submission"):
        plan_attempt(RunPaths(volume, "r1"), "intruder", resume_requested=False)
    # The supervisor turns it into a failed result without a retry, and touches nothing.
    outcome = supervise(volume, config, "intruder", False, 1, commit=lambda: None, work_dir=tmp_path)
    assert outcome["status"] == "failed" and "another submission" in outcome["error"]
    assert not (volume / "outputs").exists() and not (volume / "remote" / "r1" / "attempts.jsonl").exists()


def test_resume_choice(tmp_path):
    volume = tmp_path / "volume"
    setup_run(volume)
    paths = RunPaths(volume, "r1")
    fresh = plan_attempt(paths, "sub-1", resume_requested=False)
    assert (fresh.resume, fresh.attempt, fresh.reason) == (False, 1, "new run")
    with pytest.raises(RunError, match="no checkpoint"):
        plan_attempt(paths, "sub-1", resume_requested=True)

    # An earlier attempt died before its first checkpoint: its files move aside, training starts over.
    paths.run_dir.write_heartbeat(status="running", step=7)
    (paths.trackio / "zoo.db").parent.mkdir(parents=True)
    (paths.trackio / "zoo.db").write_bytes(b"the failed attempt's trackio run")
    aside = plan_attempt(paths, "sub-1", resume_requested=False)
    assert aside.resume is False and "starting over" in aside.reason
    assert not paths.run_dir.root.exists() and not paths.trackio.exists()
    (kept,) = (volume / "attempts" / "r1").iterdir()
    assert (kept / "outputs" / "heartbeat.json").exists() and (kept / "trackio" / "zoo.db").exists()

    # A checkpoint of this run: a retry resumes from it, at its step.
    save_checkpoint(paths.run_dir.last, {"run_name": "r1", "step": 1500, "model": {}})
    retry = plan_attempt(paths, "sub-1", resume_requested=False)
    assert (retry.resume, retry.from_step) == (True, 1500) and "retry" in retry.reason

    # Another run's checkpoint in this folder is never resumed from.
    save_checkpoint(paths.run_dir.last, {"run_name": "someone-else", "step": 9, "model": {}})
    with pytest.raises(RunError, match="belongs to run 'someone-else'"):
        plan_attempt(paths, "sub-1", resume_requested=False)


def test_trackio_snapshot_is_a_consistent_single_file(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    conn = sqlite3.connect(local / "zoo.db")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE metrics (id INTEGER PRIMARY KEY, step INTEGER)")
    conn.executemany("INSERT INTO metrics (step) VALUES (?)", [(i,) for i in range(100)])
    conn.commit()  # the connection stays open: rows may still sit in the -wal file
    (local / "media" / "zoo" / "r1" / "5").mkdir(parents=True)
    (local / "media" / "zoo" / "r1" / "5" / "grid.png").write_bytes(b"png")
    target = tmp_path / "volume" / "trackio" / "r1"
    snapshot_trackio(local, target)
    conn.close()
    assert sorted(p.name for p in target.iterdir()) == ["media", "zoo.db"]  # no -wal beside it
    with sqlite3.connect(target / "zoo.db") as copy:
        assert copy.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 100
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert (target / "media" / "zoo" / "r1" / "5" / "grid.png").read_bytes() == b"png"


def test_a_killed_dataloader_worker_is_host_memory_and_not_retried():
    for text in (
        "DataLoader worker (pid 1234) is killed by signal: Killed.",
        "DataLoader worker (pid(s) 1234, 1235) exited unexpectedly",
    ):
        exc = RuntimeError(text)
        assert not is_retryable(exc)
        assert (
            describe_exception(exc).endswith(LOADER_KILLED_HINT) and "data.num_workers" in LOADER_KILLED_HINT
        )
    assert is_retryable(RuntimeError("NCCL watchdog timeout"))


def test_host_memory_is_judged_from_the_first_rank_to_fail(tmp_path):
    paths = RunPaths(tmp_path, "r1")
    paths.registry.mkdir(parents=True)
    # Rank 0 failed first with its own error; rank 2 was SIGKILLed afterwards (collateral).
    launched = [{"rank": 0, "exitcode": 1, "signal": None}, {"rank": 2, "exitcode": -9, "signal": "SIGKILL"}]
    paths.launch_failures.write_text(json.dumps({"failures": launched, "first_rank": 0}))
    report = {"rank": 0, "error": "ValueError: bad shape", "retryable": False}
    (paths.registry / "failure-rank0.json").write_text(json.dumps(report))
    failure = collect_failure(paths, 1)
    assert (failure.error, failure.retryable) == ("ValueError: bad shape", False)
    # The SIGKILLed rank failing first is the host running out of memory.
    paths.launch_failures.write_text(json.dumps({"failures": launched, "first_rank": 2}))
    failure = collect_failure(paths, 1)
    assert (failure.error, failure.retryable) == (f"rank 2 {SIGKILL_HINT}", False)


def test_heartbeats_written_under_a_remote_attempt_carry_its_submission(tmp_path, monkeypatch):
    monkeypatch.setenv(SUBMISSION_ENV, "sub-9")  # what the supervisor sets for its training process
    assert (
        RunDir(tmp_path / "remote-run").write_heartbeat(status="running", step=1)["submission_id"] == "sub-9"
    )
    monkeypatch.delenv(SUBMISSION_ENV)
    assert "submission_id" not in RunDir(tmp_path / "local-run").write_heartbeat(status="running", step=1)
