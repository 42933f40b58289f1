"""Run folders: every run has a name and keeps all it writes under `<output_dir>/<run_name>/`.

    last.pt               newest checkpoint (refreshed every `train.save_every` steps)
    step_0001000.pt       archived checkpoints (7-digit step)
    config.toml           the resolved configuration
    metrics.jsonl         one JSON object per logged step (train/..., eval/...)
    heartbeat.json        status, step, last loss, last checkpoint, updated time
    eval.json             the last evaluation table
    samples/              sample grids / scatter plots
    loss.png              the training loss curve (refreshed at every checkpoint)

Small text files are written atomically (temporary file, then rename) so a reader — `zoo ckpts`,
`zoo sync`, a crash — never sees half of one.
"""

import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.environment import SUBMISSION_ENV
from zoo.output_paths import check_writable_dir

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})\.pt$")
# "interrupted": stopped by SIGINT/SIGTERM, after saving what it could; `--resume` continues it.
HEARTBEAT_STATUSES = ("running", "finished", "failed", "interrupted")


class RunError(RuntimeError):
    """A run folder that cannot be used as asked (collision, missing run to resume, ...)."""


class RunNotFoundError(RunError):
    """`--resume` names a run with no checkpoint: the command, not the run, must change."""


class RunInterrupted(BaseException):
    """Training stopped on SIGINT or SIGTERM; the message says where, and how to resume.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` takes it for an error.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    def archive(self, step: int) -> Path:
        return self.root / f"step_{step:07d}.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def heartbeat(self) -> Path:
        return self.root / "heartbeat.json"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss.png"

    def archived_checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.root.glob("step_*.pt"):
            match = CHECKPOINT_PATTERN.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def append_metrics(self, record: dict[str, Any]) -> None:
        # One line per write: appends of a single short line are atomic enough for readers
        # that skip a trailing partial line (read_metrics does).
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written by a live run
        return records

    def write_heartbeat(self, **fields: Any) -> dict[str, Any]:
        current = self.read_heartbeat() or {"run_name": self.name, "started": time.time()}
        current.update(fields)
        submission = os.environ.get(SUBMISSION_ENV)
        if submission:
            # A remote attempt stamps every heartbeat with its submission, so status can tell an
            # earlier attempt's heartbeat from this one's without comparing two machines' clocks.
            current["submission_id"] = submission
        current["updated"] = time.time()
        if current.get("status") not in HEARTBEAT_STATUSES:
            raise ValueError(
                f"heartbeat status must be one of {HEARTBEAT_STATUSES}, got {current.get('status')!r}"
            )
        atomic_write_json(self.heartbeat, current)
        return current

    def read_heartbeat(self) -> dict[str, Any] | None:
        if not self.heartbeat.exists():
            return None
        return json.loads(self.heartbeat.read_text())


def default_run_name(preset: str | None) -> str:
    return f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run(output_dir: str | Path, run_name: str, resume: bool) -> RunDir:
    """The folder of a new run, or of the run to resume; never another run's folder.

    Only checks: the caller creates the folder once everything that can fail on bad input has
    been built, so a refused start writes nothing.
    """
    check_writable_dir(output_dir, "output_dir")
    run = RunDir(Path(output_dir) / run_name)
    check_writable_dir(run.root, "--run-name")
    exists = run.root.exists() and any(run.root.iterdir())
    if resume:
        if not run.last.exists():
            raise RunNotFoundError(
                f"cannot resume run {run_name!r}: no checkpoint at {run.last}. "
                "Check --run-name (zoo ckpts lists runs) or start it without --resume"
            )
        return run
    if exists:
        raise RunError(
            f"run {run_name!r} already exists at {run.root}; pass --resume to continue it, "
            f"choose another --run-name, or delete it first (rm -r {shlex.quote(str(run.root))})"
        )
    return run


def check_checkpoint_owner(run: RunDir, owner: str) -> None:
    """A run resumes only from its own checkpoints: a copied or renamed folder holds another run's."""
    if owner != run.name:
        raise RunError(
            f"{run.last} belongs to run {owner!r}, not {run.name!r} (was the folder copied or renamed?); "
            f"a run resumes only from its own checkpoints: continue {owner!r} with --run-name {owner} "
            f"in its own folder, or start a new run under another --run-name"
        )
