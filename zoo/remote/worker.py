"""What runs inside the Modal container: a supervisor around the same `train_run` as `zoo train`.

The Modal function (zoo.remote.modal_app) calls `supervise`, which
  1. checks that this submission owns the run name (never trains into another run's folder);
  2. chooses: resume from `outputs/<run>/last.pt` when it exists and belongs to this run
     (a retry or preemption continues the run and its step counter), else start fresh;
  3. starts the training process(es) — `python -m zoo.remote.worker` for one GPU, torchrun
     for several — and waits, committing the Volume and a trackio snapshot every minute;
  4. when training fails, makes the heartbeat say so with the cause, commits, and either
     returns (a retry cannot help: out of memory, bad config, NaN loss...) or raises so
     Modal retries (anything else: lost GPU, network, NCCL...).
Training runs in a child process so that even a SIGKILL from the host's OOM killer, after
which no Python code of the victim runs, is seen and reported by the parent.

trackio writes to a container-local directory (SQLite on a network volume is unsafe, and two
runs writing one database file on a Volume would overwrite each other: last write wins).  The
supervisor copies it to `trackio/<run>/` on the Volume with SQLite's backup API, so every
copy there is consistent; `zoo sync` merges them all.  On a retry the copy is restored first,
so the resumed run keeps logging into the same trackio run.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo import distributed
from zoo.config.loading import config_from_dict
from zoo.devices import resolve_device
from zoo.errors import CheckpointError, DataNotFoundError
from zoo.remote.layout import ATTEMPTS, OUTPUTS, REGISTRY, TRACKIO
from zoo.remote.status import RemoteTrainingError
from zoo.runs import SUBMISSION_ENV, RunDir, RunError, atomic_write_json

# Errors a retry would meet again: the same config, data and checkpoint give the same result.
NON_RETRYABLE: tuple[type[BaseException], ...] = (
    torch.OutOfMemoryError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    NameError,
    ImportError,
    NotImplementedError,
    AssertionError,
    ArithmeticError,  # FloatingPointError: the trainer's non-finite loss
    RunError,
    CheckpointError,
    DataNotFoundError,
)
OOM_HINT = (
    " — the GPU ran out of memory: lower train.batch_size, raise train.grad_accum, lower loss.ratio, "
    "or ask for a larger GPU (--gpu A100-80GB, H100)"
)
SIGKILL_HINT = (
    "killed by SIGKILL — most likely the container ran out of host memory (the OOM killer sends "
    "SIGKILL, so the process could not report it); lower train.batch_size or data.num_workers"
)
LOADER_KILLED_HINT = (
    " — a data-loading worker process died, most likely killed by the OOM killer (the container ran "
    "out of host memory); lower data.num_workers or train.batch_size"
)
# How PyTorch's DataLoader reports a worker process that died (usually the host's OOM killer).
LOADER_KILLED = ("is killed by signal: Killed", "exited unexpectedly")
# How a process killed by SIGKILL ends: -9 from Popen or torchrun, 137 (128 + 9) through a shell.
SIGKILL_EXIT_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)
EXIT_RETRYABLE = 1
EXIT_NO_RETRY = 3


@dataclass(frozen=True)
class AttemptPlan:
    attempt: int
    resume: bool
    from_step: int | None
    reason: str
    retries_left: int


@dataclass(frozen=True)
class Failure:
    error: str
    retryable: bool


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip()
    message = type(exc).__name__ + (f": {text.splitlines()[0][:500]}" if text else "")
    if isinstance(exc, torch.OutOfMemoryError):
        message += OOM_HINT
    elif is_loader_worker_death(exc):
        message += LOADER_KILLED_HINT
    return message


def is_loader_worker_death(exc: BaseException) -> bool:
    """A DataLoader worker killed (host out of memory): a retry with the same settings dies the same way."""
    text = str(exc)
    return "DataLoader worker" in text and any(sign in text for sign in LOADER_KILLED)


def is_retryable(exc: BaseException) -> bool:
    return not isinstance(exc, NON_RETRYABLE) and not is_loader_worker_death(exc)


class RunPaths:
    """The paths of one run on the mounted Volume."""

    def __init__(self, volume_root: Path, run: str) -> None:
        self.run = run
        self.run_dir = RunDir(volume_root / OUTPUTS / run)
        self.registry = volume_root / REGISTRY / run
        self.trackio = volume_root / TRACKIO / run
        self.attempts_root = volume_root / ATTEMPTS / run

    @property
    def submission(self) -> Path:
        return self.registry / "submission.json"

    @property
    def attempts_log(self) -> Path:
        return self.registry / "attempts.jsonl"

    @property
    def train_log(self) -> Path:
        """The training output of every attempt; kept here, not in the run folder, which the
        trainer insists on creating itself."""
        return self.registry / "train.log"

    @property
    def launch_failures(self) -> Path:
        """How torchrun's processes ended when one failed (zoo.training.launch writes it)."""
        return self.registry / "torchrun-failures.json"

    def failure_files(self) -> list[Path]:
        return sorted(self.registry.glob("failure-rank*.json"))

    def stale_failure_files(self) -> list[Path]:
        """What an earlier attempt's failure left: the next attempt must not read it as its own."""
        return [*self.failure_files(), *([self.launch_failures] if self.launch_failures.exists() else [])]


def read_attempts(paths: RunPaths) -> list[dict[str, Any]]:
    if not paths.attempts_log.exists():
        return []
    return [json.loads(line) for line in paths.attempts_log.read_text().splitlines() if line.strip()]


def append_attempt(paths: RunPaths, record: dict[str, Any]) -> None:
    paths.registry.mkdir(parents=True, exist_ok=True)
    with open(paths.attempts_log, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def checkpoint_owner(path: Path) -> tuple[str, int]:
    """(run_name, step) stored in a checkpoint; mmap reads only what is needed."""
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return str(payload["run_name"]), int(payload["step"])


def plan_attempt(paths: RunPaths, submission_id: str, resume_requested: bool) -> AttemptPlan:
    """Resume or start fresh; move aside what an earlier attempt left without a checkpoint."""
    if not paths.submission.exists():
        raise RunError(f"no submission record at {paths.submission}: submit runs with `zoo modal submit`")
    submission = json.loads(paths.submission.read_text())
    owner = submission["submission_id"]
    if owner != submission_id:
        raise RunError(
            f"run {paths.run!r} belongs to another submission ({owner}); this one ({submission_id}) "
            "will not touch it. Submit under another --run-name"
        )
    attempt = (
        sum(1 for a in read_attempts(paths) if a["event"] == "start" and a["submission_id"] == submission_id)
        + 1
    )
    retries_left = int(submission["retries"]) - (attempt - 1)
    last = paths.run_dir.last
    if last.exists():
        stored_run, step = checkpoint_owner(last)
        if stored_run != paths.run:
            raise RunError(
                f"{last} belongs to run {stored_run!r}, not {paths.run!r}; refusing to resume from it"
            )
        first = resume_requested and attempt == 1
        reason = "resuming the run (--resume)" if first else "retry: resuming from the last checkpoint"
        return AttemptPlan(attempt, True, step, f"{reason} at step {step}", retries_left)
    if resume_requested:
        raise RunError(f"cannot resume run {paths.run!r}: no checkpoint at {last}")
    if paths.run_dir.root.exists() and any(paths.run_dir.root.iterdir()):
        aside = paths.attempts_root / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        paths.run_dir.root.rename(aside / OUTPUTS)
        if paths.trackio.exists():  # its trackio run too: the new attempt starts a new one
            paths.trackio.rename(aside / TRACKIO)
        reason = f"the previous attempt ended before its first checkpoint; starting over (its files: {aside})"
        return AttemptPlan(attempt, False, None, reason, retries_left)
    return AttemptPlan(attempt, False, None, "new run", retries_left)


def snapshot_trackio(local: Path, target: Path) -> None:
    """Copy trackio's databases (consistently, via SQLite backup) and new media to `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for database in sorted(local.glob("*.db")):
        tmp = target / f".{database.name}.tmp-{os.getpid()}"
        source = sqlite3.connect(database, timeout=60)
        copy = sqlite3.connect(tmp)
        try:
            source.backup(copy)
            # One self-contained file on the Volume: no -wal beside it to get out of step.
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            copy.close()
            source.close()
        os.replace(tmp, target / database.name)
    media = local / "media"
    if media.is_dir():
        for path in media.rglob("*"):
            dest = target / "media" / path.relative_to(media)
            if path.is_file() and not (dest.exists() and dest.stat().st_size == path.stat().st_size):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)


def restore_trackio(source: Path, local: Path) -> None:
    local.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, local, dirs_exist_ok=True)


def worker_command(paths: RunPaths, config_path: Path, resume: bool, nproc: int, command: str) -> list[str]:
    args = ["--config", str(config_path), "--failure-dir", str(paths.registry), "--command", command]
    if resume:
        args.append("--resume")
    if nproc == 1:
        return [sys.executable, "-m", "zoo.remote.worker", *args]
    return distributed.torchrun_command(nproc, "zoo.remote.worker", args, failures_file=paths.launch_failures)


def collect_failure(paths: RunPaths, returncode: int) -> Failure:
    """Why the training process(es) failed, and whether a retry could help.

    Under torchrun a rank the OOM killer took leaves no report, and torchrun exits with 1 like
    any crash: its launcher's record (torchrun-failures.json) says which rank died of SIGKILL.
    When that rank failed first, its death is the cause; the other ranks' errors (a collective
    that lost its peer) are consequences, and a retry would run out of memory again.
    """
    record = json.loads(paths.launch_failures.read_text()) if paths.launch_failures.exists() else None
    launched = [] if record is None else record["failures"]
    # The first rank to fail is the root cause (torchrun's own judgement); a rank killed later
    # may be collateral, and says nothing about host memory.
    first = next((f for f in launched if f["rank"] == record["first_rank"]), None)
    if first is not None and first["exitcode"] in SIGKILL_EXIT_CODES:
        return Failure(f"rank {first['rank']} {SIGKILL_HINT}", retryable=False)
    if returncode in SIGKILL_EXIT_CODES:
        return Failure(f"training process {SIGKILL_HINT}", retryable=False)
    # A rank that failed for good (out of memory, say) is the cause; then a rank that a signal
    # killed; the other ranks' errors (a collective that lost its peer) are consequences.
    reports = sorted((json.loads(p.read_text()) for p in paths.failure_files()), key=lambda r: r["rank"])
    final = [r for r in reports if not r["retryable"]]
    if final:
        return Failure(final[0]["error"], retryable=False)
    signalled = [f"rank {f['rank']} killed by {f['signal']}" for f in launched if f["signal"] is not None]
    if signalled:
        return Failure(", ".join(signalled), retryable=True)
    if reports:
        return Failure(reports[0]["error"], retryable=True)
    if returncode < 0:
        return Failure(f"training process killed by {signal.Signals(-returncode).name}", retryable=True)
    return Failure(
        f"training exited with code {returncode} without reporting an error (a killed rank?); "
        "see `zoo modal logs`",
        retryable=True,
    )


def mark_failed(paths: RunPaths, failure: Failure, plan: AttemptPlan, submission_id: str) -> None:
    """The heartbeat says failed, with the cause, whether Modal will try again, and whose attempt it was."""
    retrying = failure.retryable and plan.retries_left > 0
    paths.run_dir.write_heartbeat(
        status="failed",
        error=failure.error,
        attempt=plan.attempt,
        retrying=retrying,
        submission_id=submission_id,
    )


def _tee(process: subprocess.Popen, log: Path, attempt: int) -> None:
    """Training output to the container's stdout (Modal's logs) and to the run's train.log."""
    with open(log, "ab") as handle:
        handle.write(f"\n===== attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        for line in process.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            handle.write(line)
            handle.flush()


def _publish_progress(local_trackio: Path, volume_trackio: Path, commit: Callable[[], None]) -> None:
    """Periodic trackio copy and Volume commit while training runs.

    A failure here (a busy database, a commit the Volume refused) must not end a healthy
    training run: it is reported and the next period tries again.
    """
    try:
        snapshot_trackio(local_trackio, volume_trackio)
        commit()
    except Exception as exc:  # noqa: BLE001 - any error: report, keep training
        print(
            f"[zoo] warning: publishing progress failed ({type(exc).__name__}: {exc}); retrying later",
            flush=True,
        )


# Below Modal's own grace after it signals the container (about 30 s), so that the supervisor
# still marks, snapshots and commits what the child wrote; a local `zoo train` gives its ranks
# distributed.STOP_GRACE_S instead.
CHILD_STOP_GRACE_S = 25.0


def _stop_child(process: subprocess.Popen, grace_s: float = CHILD_STOP_GRACE_S) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def supervise(
    volume_root: Path,
    config: dict[str, Any],
    submission_id: str,
    resume: bool,
    nproc: int,
    commit: Callable[[], None],
    work_dir: Path,
    commit_every: float = 60.0,
    command: str = "zoo modal submit",
    child_command: list[str] | None = None,
) -> dict[str, Any]:
    """Run one attempt of a remote training run (see the module doc). Returns its outcome."""
    paths = RunPaths(volume_root, config["run_name"])
    try:
        plan = plan_attempt(paths, submission_id, resume)
    except RunError as exc:
        # Not this submission's run, or nothing to resume: a retry would meet the same answer,
        # and the run's heartbeat may belong to someone else, so only Modal's result records it.
        print(f"[zoo] refusing to train: {exc}", file=sys.stderr, flush=True)
        return {"run_name": paths.run, "status": "failed", "error": f"RunError: {exc}", "attempt": None}
    for stale in paths.stale_failure_files():
        stale.unlink()
    local_trackio = work_dir / "trackio"
    restore_trackio(paths.trackio, local_trackio)
    config_path = work_dir / "config.json"
    config_path.write_text(json.dumps(config))
    append_attempt(
        paths,
        {
            "event": "start",
            "submission_id": submission_id,
            "attempt": plan.attempt,
            "time": time.time(),
            "resume": plan.resume,
            "from_step": plan.from_step,
            "reason": plan.reason,
            "host": socket.gethostname(),
            "nproc": nproc,
        },
    )
    print(f"[zoo] run {paths.run}, attempt {plan.attempt}: {plan.reason}", flush=True)
    commit()

    argv = child_command or worker_command(paths, config_path, plan.resume, nproc, command)
    env = {
        **os.environ,
        "TRACKIO_DIR": str(local_trackio),
        "PYTHONUNBUFFERED": "1",
        SUBMISSION_ENV: submission_id,
    }
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tee = threading.Thread(target=_tee, args=(process, paths.train_log, plan.attempt), daemon=True)
    tee.start()
    try:
        while True:
            try:
                returncode = process.wait(timeout=commit_every)
                break
            except subprocess.TimeoutExpired:
                _publish_progress(local_trackio, paths.trackio, commit)
    except BaseException as exc:  # Modal's timeout or a shutdown signal: stop training, keep what it wrote
        _stop_child(process)
        if not isinstance(exc, KeyboardInterrupt):
            mark_failed(paths, Failure(describe_exception(exc), retryable=True), plan, submission_id)
        append_attempt(
            paths, {"event": "end", "attempt": plan.attempt, "time": time.time(), "outcome": "interrupted"}
        )
        snapshot_trackio(local_trackio, paths.trackio)
        commit()
        raise

    tee.join(timeout=30)
    snapshot_trackio(local_trackio, paths.trackio)
    if returncode == 0:
        append_attempt(
            paths, {"event": "end", "attempt": plan.attempt, "time": time.time(), "outcome": "finished"}
        )
        commit()
        return {"run_name": paths.run, "status": "finished", "attempt": plan.attempt}
    failure = collect_failure(paths, returncode)
    mark_failed(paths, failure, plan, submission_id)
    append_attempt(
        paths,
        {
            "event": "end",
            "attempt": plan.attempt,
            "time": time.time(),
            "outcome": "failed",
            "error": failure.error,
            "retryable": failure.retryable,
        },
    )
    commit()
    print(f"[zoo] run {paths.run} failed: {failure.error}", file=sys.stderr, flush=True)
    if failure.retryable:
        raise RemoteTrainingError(failure.error)
    return {"run_name": paths.run, "status": "failed", "error": failure.error, "attempt": plan.attempt}


def write_failure(failure_dir: Path, exc: BaseException) -> None:
    rank = distributed.rank() if distributed.is_initialized() else int(os.environ.get("RANK", "0"))
    atomic_write_json(
        failure_dir / f"failure-rank{rank}.json",
        {
            "rank": rank,
            "error": describe_exception(exc),
            "retryable": is_retryable(exc),
            "time": time.time(),
            "traceback": traceback.format_exc()[-4000:],
        },
    )


def main(argv: list[str] | None = None, train: Callable[..., Any] | None = None) -> int:
    """One training process (of torchrun's N): the same `train_run` as `zoo train`.

    `train` replaces train_run (tests use it to fail in chosen ways).
    """
    parser = argparse.ArgumentParser(prog="python -m zoo.remote.worker")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--failure-dir", type=Path, required=True)
    parser.add_argument("--command", default="zoo modal submit")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_from_dict(json.loads(args.config.read_text()))
    if train is None:
        from zoo.training.trainer import train_run  # late: the supervisor never needs the training stack

        train = train_run
    try:
        distributed.init(device_type=resolve_device(cfg.device).type)
        train(cfg, resume=args.resume, command=args.command)
    except BaseException as exc:
        write_failure(args.failure_dir, exc)
        traceback.print_exc()
        return EXIT_RETRYABLE if is_retryable(exc) else EXIT_NO_RETRY
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
