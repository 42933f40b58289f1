"""Runs and their checkpoints, local and remote, for `zoo ckpts` and `zoo modal status`.

A run is listed from files only: its folder's checkpoints (name, size, mtime), heartbeat.json
(state, step, loss), eval.json or the last eval record of metrics.jsonl (the key metric) and,
for remote runs, the registry files `zoo modal submit` wrote.  Remote runs come either live
from the Volume or from the mirrors `zoo sync` made (`<run>@remote/`), which list them as of
the sync.
"""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from zoo.checkpoint_files import checkpoint_problem
from zoo.errors import CheckpointError
from zoo.remote.layout import (
    CHECKPOINT_SUFFIX,
    OUTPUTS,
    REGISTRY,
    RUN_NAME_PATTERN,
    is_mirror,
    is_transient_file,
    remote_run_of,
)
from zoo.remote.status import DEFAULT_STALL_AFTER, CallState, RunStatus, format_duration, run_status
from zoo.remote.store import LocalDirStore, RunStore, StoreEntry
from zoo.remote.submission import stopped_path
from zoo.remote.sync import REGISTRY_MIRROR, read_manifest
from zoo.runs import CHECKPOINT_PATTERN, HEARTBEAT_STATUSES, json_object, writer_gone

# Which metric a table shows, in order of preference: the headline numbers of zoo's evaluations
# (FID, then the feature-space FD of images, then energy distance), and among them the 1-step
# MeanFlow sampler (the point of the method).
KEY_METRIC_PREFERENCE = ("fid", "eval/fd_", "energy", "loss")
HEADLINE_SAMPLER = "meanflow_1"


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    path: str
    step: int | None
    size: int
    mtime: float
    where: str
    damaged: str | None = None  # why a local checkpoint would be refused by load_checkpoint


@dataclass(frozen=True)
class RunInfo:
    name: str
    where: str
    status: RunStatus
    checkpoints: list[CheckpointInfo]
    key_metric: tuple[str, float] | None
    heartbeat: dict[str, Any] | None
    submission: dict[str, Any] | None
    folder: str


def checkpoint_step_from_name(name: str) -> int | None:
    match = CHECKPOINT_PATTERN.match(name)
    return int(match.group(1)) if match else None


def peek_checkpoint_step(path: Path) -> int | None:
    """The step stored in a local checkpoint (mmap keeps this cheap for large files); None if unreadable."""
    import torch  # here, not at the top: listing runs and syncing them need no torch until a file is read

    try:
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign file: the listing shows "?" rather than failing
        return None
    return int(payload["step"]) if isinstance(payload, dict) and "step" in payload else None


def _flatten(data: Any, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}/" if isinstance(value, dict) else f"{prefix}{key}"))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        flat[prefix.rstrip("/")] = float(data)
    return flat


def key_metric(values: dict[str, Any]) -> tuple[str, float] | None:
    """The headline number among `values` (nested dicts are flattened with '/').

    Standard errors (`_se`) and the data-vs-data noise floor are context, not results.
    """
    flat = {k: v for k, v in _flatten(values).items() if not k.endswith("_se") and "floor" not in k}
    for wanted in KEY_METRIC_PREFERENCE:
        matching = sorted(k for k in flat if wanted in k.lower())
        if matching:
            best = next((k for k in matching if k.endswith(HEADLINE_SAMPLER)), matching[0])
            return best, flat[best]
    return None


def eval_json_metrics(data: dict[str, Any]) -> dict[str, float]:
    """eval.json (`{"rows": [{"kind", "steps", "energy_distance", ...}], ...}`) as flat eval/ metrics."""
    if not isinstance(data.get("rows"), list):
        return _flatten(data)
    flat = {}
    for row in data["rows"]:
        if not isinstance(row, dict):
            continue  # a damaged eval.json shows no metric rather than failing the listing
        for key in ("fid", "energy_distance"):
            if isinstance(row.get(key), (int, float)):
                name = "fid" if key == "fid" else "energy"
                flat[f"eval/{name}_{row.get('kind')}_{row.get('steps')}"] = float(row[key])
        fd = row.get("scores", {}).get("fd", {}).get("value")
        if isinstance(fd, (int, float)):
            flat[f"eval/fd_{row.get('kind')}_{row.get('steps')}"] = float(fd)
    return flat


def _last_eval_record(metrics_text: str) -> dict[str, Any] | None:
    for line in reversed(metrics_text.splitlines()):
        record = json_object(line)
        if record is None:
            continue  # a line still being written, or damaged
        if any(key.startswith("eval/") for key in record):
            return {k: v for k, v in record.items() if k.startswith("eval/")}
    return None


def _read_json(store: RunStore, path: str) -> dict[str, Any] | None:
    """A small JSON file of a run, or None when it is missing, caught half-written or damaged."""
    if store.stat(path) is None:
        return None
    return json_object(store.read_bytes(path))


def _read_heartbeat(store: RunStore, path: str) -> dict[str, Any] | None:
    """A heartbeat that has what run_status reads (a known status, a time); None otherwise."""
    heartbeat = _read_json(store, path)
    if heartbeat is None or heartbeat.get("status") not in HEARTBEAT_STATUSES:
        return None
    updated = heartbeat.get("updated")
    return heartbeat if isinstance(updated, (int, float)) and not isinstance(updated, bool) else None


DAMAGED_HEARTBEAT = RunStatus(
    "unknown", "heartbeat.json is damaged (not a heartbeat zoo wrote)", None, None, None, None, None
)


def _local_status(
    folder: Path, heartbeat: dict[str, Any] | None, files: dict, now: float, stall_after: float
) -> RunStatus:
    if heartbeat is None and "heartbeat.json" in files:
        return DAMAGED_HEARTBEAT
    status = run_status(heartbeat, now, stall_after)
    if status.state in ("running", "stalled"):
        # A local run can say more than its heartbeat's age: whether its process still lives.
        gone = writer_gone(folder, heartbeat)
        if gone is not None:
            again = "--resume" if "last.pt" in files else "--restart (it saved no checkpoint)"
            return replace(status, state="dead", detail=f"{gone}; continue it with {again}", phase=None)
    return status


def _key_metric_of(
    store: RunStore, folder: str, files: dict[str, StoreEntry], heartbeat: dict | None, local: bool
):
    if "eval.json" in files:
        evaluation = _read_json(store, f"{folder}/eval.json")
        found = key_metric(eval_json_metrics(evaluation)) if evaluation else None
        if found:
            return found
    if local and "metrics.jsonl" in files:
        record = _last_eval_record(store.read_bytes(f"{folder}/metrics.jsonl").decode(errors="replace"))
        found = key_metric(record) if record else None
        if found:
            return found
    if heartbeat is not None and heartbeat.get("loss") is not None:
        return "train/loss", float(heartbeat["loss"])
    return None


def _checkpoints(
    store: RunStore, folder: str, files: dict[str, StoreEntry], heartbeat: dict | None, where: str
) -> list[CheckpointInfo]:
    found = []
    for name, entry in files.items():
        if not name.endswith(CHECKPOINT_SUFFIX) or is_transient_file(name):
            continue
        step = checkpoint_step_from_name(name)
        if step is None and heartbeat is not None and name == "last.pt":
            step = heartbeat.get("checkpoint_step")  # the step of the last.pt the trainer last wrote
        damaged = None
        if isinstance(store, LocalDirStore):
            damaged = local_checkpoint_problem(store.root / entry.path)
            if step is None and damaged is None:
                step = peek_checkpoint_step(store.root / entry.path)
        found.append(CheckpointInfo(name, entry.path, step, entry.size, entry.mtime, where, damaged))
    return sorted(found, key=lambda c: (c.name != "last.pt", -(c.step or 0), c.name))


def local_checkpoint_problem(path: Path) -> str | None:
    """Why load_checkpoint would refuse a local checkpoint (zoo.checkpoint_files), or None."""
    try:
        with path.open("rb") as handle:
            return checkpoint_problem(path, handle)
    except (CheckpointError, OSError) as exc:  # an unreadable sidecar, a file gone meanwhile
        return str(exc)


def _group_files(entries: list[StoreEntry], depth: int) -> dict[str, dict[str, StoreEntry]]:
    """{run: {file name: entry}} for files directly inside each run folder at path depth `depth`."""
    grouped: dict[str, dict[str, StoreEntry]] = {}
    for entry in entries:
        parts = PurePosixPath(entry.path).parts
        if len(parts) == depth + 1 and entry.is_dir:
            grouped.setdefault(parts[depth], {})
        elif len(parts) == depth + 2 and not entry.is_dir:
            grouped.setdefault(parts[depth], {})[parts[depth + 1]] = entry
    return grouped


def list_local_runs(
    outputs_dir: Path,
    now: float | None = None,
    stall_after: float = DEFAULT_STALL_AFTER,
    include_mirrors: bool = True,
) -> list[RunInfo]:
    """Runs under a local outputs folder; mirrors of remote runs as of their last sync."""
    now = time.time() if now is None else now
    store = LocalDirStore(outputs_dir)
    infos = []
    for name, files in sorted(_group_files(store.list("", recursive=False), 0).items()):
        files = {child.name: child for child in store.list(name) if not child.is_dir}
        if is_mirror(name):
            if include_mirrors:
                infos.append(_mirror_info(store, name, files, now, stall_after))
            continue
        if not RUN_NAME_PATTERN.match(name):
            continue
        heartbeat = _read_heartbeat(store, f"{name}/heartbeat.json") if "heartbeat.json" in files else None
        infos.append(
            RunInfo(
                name=name,
                where="local",
                status=_local_status(outputs_dir / name, heartbeat, files, now, stall_after),
                checkpoints=_checkpoints(store, name, files, heartbeat, "local"),
                key_metric=_key_metric_of(store, name, files, heartbeat, local=True),
                heartbeat=heartbeat,
                submission=None,
                folder=str(outputs_dir / name),
            )
        )
    return infos


def _mirror_info(
    store: LocalDirStore, name: str, files: dict[str, StoreEntry], now: float, stall_after: float
) -> RunInfo:
    manifest = read_manifest(store.root / name) or {"checkpoints": [], "synced_at": now}
    synced_at = float(manifest["synced_at"])
    heartbeat = _read_heartbeat(store, f"{name}/heartbeat.json") if "heartbeat.json" in files else None
    submission = _read_json(store, f"{name}/{REGISTRY_MIRROR}/submission.json")
    stopped = _read_json(store, f"{name}/{REGISTRY_MIRROR}/stopped.json")
    # The state as it was when synced: judging an old copy against `now` would call every
    # synced run that was healthy at the time "stalled".
    status = run_status(
        heartbeat,
        synced_at,
        stall_after,
        submitted_at=submission["submitted"] if submission else None,
        stopped_at=stopped["stopped"] if stopped else None,
    )
    remote_checkpoints = [
        CheckpointInfo(
            c["name"],
            f"{name}/{c['name']}",
            checkpoint_step_from_name(c["name"]),
            c["size"],
            c["mtime"],
            "remote",
        )
        for c in manifest["checkpoints"]
    ]
    if heartbeat is not None:
        remote_checkpoints = [
            CheckpointInfo(c.name, c.path, heartbeat.get("checkpoint_step"), c.size, c.mtime, c.where)
            if c.name == "last.pt" and c.step is None
            else c
            for c in remote_checkpoints
        ]
    downloaded = _checkpoints(store, name, files, heartbeat, "local")
    return RunInfo(
        name=remote_run_of(name),
        where=f"remote (synced {format_duration(now - synced_at)} ago)",
        status=status,
        checkpoints=sorted(
            downloaded + remote_checkpoints, key=lambda c: (c.name != "last.pt", -(c.step or 0))
        ),
        key_metric=_key_metric_of(store, name, files, heartbeat, local=True),
        heartbeat=heartbeat,
        submission=submission,
        folder=str(store.root / name),
    )


def list_store_runs(
    store: RunStore,
    now: float | None = None,
    stall_after: float = DEFAULT_STALL_AFTER,
    call_lookup: Callable[[str], CallState | None] | None = None,
    workers: int = 8,
) -> list[RunInfo]:
    """Runs on a store with the Volume layout (live remote listing).

    `call_lookup(call_id)` asks Modal about a run's function call; it is consulted only for
    runs whose files cannot tell (no heartbeat yet, or a stale one), to name a failure the
    container could not write down (image build error, crash outside training).  None: Modal
    could not say.
    """
    now = time.time() if now is None else now
    runs = _group_files(store.list(OUTPUTS, recursive=True), 1)
    registry = _group_files(store.list(REGISTRY, recursive=True), 1)
    names = sorted(n for n in set(runs) | set(registry) if RUN_NAME_PATTERN.match(n))

    def info(name: str) -> RunInfo:
        folder = f"{OUTPUTS}/{name}"
        files = runs.get(name, {})
        heartbeat = _read_heartbeat(store, f"{folder}/heartbeat.json") if "heartbeat.json" in files else None
        submission = _read_json(store, f"{REGISTRY}/{name}/submission.json")
        stopped = _read_json(store, stopped_path(name))
        timing = {
            "submitted_at": submission["submitted"] if submission else None,
            "stopped_at": stopped["stopped"] if stopped else None,
            "submission_id": submission.get("submission_id") if submission else None,
        }
        status = run_status(heartbeat, now, stall_after, **timing)
        call_id = submission.get("call_id") if submission else None
        if status.state in ("pending", "stalled") and call_lookup is not None and call_id:
            status = run_status(heartbeat, now, stall_after, call=call_lookup(call_id), **timing)
        return RunInfo(
            name=name,
            where=store.label,
            status=status,
            checkpoints=_checkpoints(store, folder, files, heartbeat, store.label),
            key_metric=_key_metric_of(store, folder, files, heartbeat, local=False),
            heartbeat=heartbeat,
            submission=submission,
            folder=folder,
        )

    # Each read is a round trip on a real Volume: overlap them.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(info, names))
