"""`zoo clean`: list, then (only when asked) delete old checkpoints.

What may go:  archived checkpoints (`step_XXXXXXX.pt`) beyond the newest `keep_last` of a run,
and temporaries left by interrupted atomic writes (`.last.pt.tmp-123`).
What never goes: any run's `last.pt`; the archived checkpoint its eval.json was computed from
(the final evaluation names it: the model behind a reported number stays reproducible);
anything of a run that may be being written — a process holds its lock (zoo.runs.RunLock; a
local folder or a local copy of the Volume), its heartbeat says running and names a live process
on this machine, or says running and is recent, or (unless its heartbeat says finished or failed)
any of its files changed recently, which catches a run that has not written its first heartbeat
yet — unless its heartbeat says running but names a process of this machine that is certainly
gone (killed; nobody holds the lock: zoo.runs.writer_gone); anything of a run whose heartbeat.json
or eval.json cannot be read (damaged: what it would say is unknown); anything that changed between
the listing and the deletion (the plan records size and mtime, and each run and file is checked
again just before deleting).
Patterns that select every run are refused unless `--all`: those with no literal character
(`*`, `**`, `?*`) at once, and any other glob (`c*` where every run starts with c) once the runs
are listed.
"""

import fnmatch
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from zoo.remote.layout import CHECKPOINT_SUFFIX, RUN_NAME_PATTERN, is_transient_file
from zoo.remote.listing import checkpoint_step_from_name
from zoo.remote.status import DEFAULT_STALL_AFTER, format_duration, is_live_writer
from zoo.remote.store import RunStore, StoreEntry
from zoo.runs import json_object, process_alive

NEVER_DELETE = "last.pt"
_UNIVERSAL = re.compile(r"^[*?]*$")


class CleanError(ValueError):
    pass


@dataclass(frozen=True)
class Deletion:
    run: str
    path: str
    size: int
    mtime: float
    reason: str


@dataclass
class CleanPlan:
    deletions: list[Deletion] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    runs_matched: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(d.size for d in self.deletions)


@dataclass
class CleanResult:
    deleted: list[Deletion] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(d.size for d in self.deleted)


def matches_everything(pattern: str) -> bool:
    return bool(_UNIVERSAL.match(pattern)) and pattern.count("?") <= 1


def check_pattern(pattern: str | None, allow_all: bool) -> str:
    """The pattern to use; refuses to select every run unless `allow_all`."""
    if pattern is None or matches_everything(pattern):
        if not allow_all:
            shown = "no pattern" if pattern is None else f"pattern {pattern!r}"
            raise CleanError(
                f"{shown} selects every run; give a pattern naming runs (e.g. 'cifar10-*') "
                "or pass --all to clean every run"
            )
        return "*"
    return pattern


def _run_folders(store: RunStore, runs_prefix: str) -> dict[str, list[StoreEntry]]:
    grouped: dict[str, list[StoreEntry]] = {}
    depth = len(PurePosixPath(runs_prefix).parts) if runs_prefix else 0
    for entry in store.list(runs_prefix, recursive=True):
        parts = PurePosixPath(entry.path).parts
        if len(parts) <= depth:
            continue
        run = parts[depth]
        if not RUN_NAME_PATTERN.match(run):
            continue
        grouped.setdefault(run, [])
        if not entry.is_dir:
            grouped[run].append(entry)
    return grouped


class Unreadable(Exception):
    """A run file clean needs cannot be read; the message says which, and the run is left alone."""


def _json_file(store: RunStore, path: str) -> dict | None:
    """A small JSON file of a run; None when it does not exist; Unreadable when it is no JSON object."""
    if store.stat(path) is None:
        return None
    parsed = json_object(store.read_bytes(path))
    if parsed is None:
        name = PurePosixPath(path).name
        raise Unreadable(f"{name} cannot be read (damaged, or caught being written); fix or delete it")
    return parsed


def _evaluated_checkpoint(store: RunStore, folder: str, top_level: list[StoreEntry]) -> str | None:
    """The archive the run's final evaluation (eval.json) names, if it has one."""
    if not any(f.name == "eval.json" for f in top_level):
        return None
    checkpoint = (_json_file(store, f"{folder}/eval.json") or {}).get("checkpoint")
    if not isinstance(checkpoint, str):
        raise Unreadable("eval.json names no checkpoint; fix or delete it")
    return checkpoint


def _live_here(heartbeat: dict) -> bool:
    """Whether the heartbeat's writer is a live process of this machine."""
    pid = heartbeat.get("pid")
    return heartbeat.get("host") == socket.gethostname() and isinstance(pid, int) and process_alive(pid)


def _busy_reason(
    store: RunStore, folder: str, files: list[StoreEntry], now: float, live_window: float
) -> str | None:
    writer = store.writer(folder)
    if writer is not None:
        return f"being trained by {writer}"
    try:
        heartbeat = _json_file(store, f"{folder}/heartbeat.json")
    except Unreadable as exc:
        return str(exc)
    if heartbeat is not None and heartbeat.get("status") in ("finished", "failed", "interrupted"):
        return None  # its writer is done (a retry starting later says "running" again, and is re-checked)
    if store.writer_gone(folder, heartbeat) is not None:
        return None  # "running", but its process is gone (killed) and nobody holds its lock
    if heartbeat is not None and heartbeat.get("status") == "running" and _live_here(heartbeat):
        return f"being trained by process {heartbeat['pid']} (its heartbeat says running)"
    if is_live_writer(heartbeat, now, live_window):
        updated = heartbeat.get("updated")
        when = f"{format_duration(now - updated)} ago" if isinstance(updated, (int, float)) else "undated"
        return f"still being written (heartbeat {when})"
    newest = max((f.mtime for f in files), default=None)
    if newest is not None and now - newest < live_window:
        return f"still being written (a file changed {format_duration(now - newest)} ago)"
    return None


def select_runs(
    runs: dict[str, list[StoreEntry]], pattern: str, allow_all: bool
) -> dict[str, list[StoreEntry]]:
    """The runs `pattern` names; a glob that names every run is refused unless `allow_all`.

    A literal name is never refused (it names one run, even when that is the only one).
    """
    selected = {run: files for run, files in runs.items() if fnmatch.fnmatchcase(run, pattern)}
    is_glob = any(char in pattern for char in "*?[")
    if not allow_all and is_glob and selected and len(selected) == len(runs):
        raise CleanError(
            f"pattern {pattern!r} selects every run ({len(runs)}); give a pattern naming fewer runs "
            "or pass --all to clean every run"
        )
    return selected


def plan_clean(
    store: RunStore,
    runs_prefix: str,
    pattern: str,
    keep_last: int,
    now: float | None = None,
    live_window: float = DEFAULT_STALL_AFTER,
    allow_all: bool = False,
) -> CleanPlan:
    """What `zoo clean` would delete under `runs_prefix` ('' for a local outputs folder,
    'outputs' on the Volume)."""
    if keep_last < 0:
        raise CleanError(f"--keep-last must be 0 or more, got {keep_last}")
    now = time.time() if now is None else now
    plan = CleanPlan()
    for run, files in sorted(select_runs(_run_folders(store, runs_prefix), pattern, allow_all).items()):
        plan.runs_matched.append(run)
        folder = f"{runs_prefix}/{run}" if runs_prefix else run
        busy = _busy_reason(store, folder, files, now, live_window)
        if busy:
            plan.skipped.append((run, busy))
            continue
        top_level = [f for f in files if PurePosixPath(f.path).parent == PurePosixPath(folder)]
        try:
            evaluated = _evaluated_checkpoint(store, folder, top_level)
        except Unreadable as exc:
            plan.skipped.append((run, str(exc)))
            continue
        archived = sorted(
            (f for f in top_level if checkpoint_step_from_name(f.name) is not None and f.name != evaluated),
            key=lambda f: checkpoint_step_from_name(f.name),
        )
        doomed = archived[: max(0, len(archived) - keep_last)]
        by_name = {f.name: f for f in top_level}
        for entry in doomed:
            plan.deletions.append(
                Deletion(
                    run,
                    entry.path,
                    entry.size,
                    entry.mtime,
                    f"archived checkpoint beyond --keep-last {keep_last}",
                )
            )
            checksum = by_name.get(f"{entry.name}.sha256")  # goes with its checkpoint
            if checksum is not None:
                plan.deletions.append(
                    Deletion(
                        run, checksum.path, checksum.size, checksum.mtime, "checksum of a deleted checkpoint"
                    )
                )
        for entry in top_level:
            if is_transient_file(entry.name) and CHECKPOINT_SUFFIX in entry.name:
                plan.deletions.append(
                    Deletion(
                        run,
                        entry.path,
                        entry.size,
                        entry.mtime,
                        "temporary file of an interrupted checkpoint write",
                    )
                )
    return plan


def execute_clean(
    store: RunStore,
    plan: CleanPlan,
    runs_prefix: str,
    now: float | None = None,
    live_window: float = DEFAULT_STALL_AFTER,
) -> CleanResult:
    """Delete what `plan` lists, checking each run and file again first (a writer may have started)."""
    result = CleanResult()
    by_run: dict[str, list[Deletion]] = {}
    for deletion in plan.deletions:
        by_run.setdefault(deletion.run, []).append(deletion)
    for run, deletions in by_run.items():
        folder = f"{runs_prefix}/{run}" if runs_prefix else run
        current = time.time() if now is None else now
        files = [e for e in store.list(folder, recursive=True) if not e.is_dir]
        busy = _busy_reason(store, folder, files, current, live_window)
        if busy:
            result.skipped.append((run, busy))
            continue
        for deletion in deletions:
            if PurePosixPath(deletion.path).name == NEVER_DELETE:
                raise CleanError(f"refusing to delete {deletion.path}: a run's last.pt is never deleted")
            entry = store.stat(deletion.path)
            if entry is None:
                continue  # already gone
            if entry.size != deletion.size or int(entry.mtime) != int(deletion.mtime):
                result.skipped.append((run, f"{deletion.path} changed since it was listed"))
                continue
            store.remove(deletion.path)
            result.deleted.append(deletion)
    return result
