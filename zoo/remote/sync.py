"""`zoo sync`: pull remote runs' small files and trackio data into the local store.

What arrives:
  * every file of `outputs/<run>/` except checkpoints (*.pt) and temporaries of atomic writes,
    into `<outputs>/<run>@remote/` (a remote run never lands on a local run's folder);
  * a manifest of the run's remote checkpoints (`.zoo-remote.json`), so `zoo ckpts` can list
    them offline;
  * `remote/<run>/*` (submission, attempts, stop marker) into `<run>@remote/.zoo-remote/`;
  * every trackio database under `trackio/` (one folder per remote run, `trackio/<run>/<project>.db`,
    see zoo.remote.worker), merged row by row into `$TRACKIO_DIR/<project>.db` with the runs
    renamed `<run>@remote` (zoo.remote.trackio_merge), and the media beside it.

Idempotent: a file is fetched only when its size or mtime differs from the local copy (the
local copy gets the remote mtime), trackio rows are keyed by their log_id.  A database caught
mid-write (an incomplete copy) is reported and skipped; the next sync picks it up.
"""

import fnmatch
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from zoo.remote.layout import (
    CHECKPOINT_SUFFIX,
    MIRROR_MANIFEST,
    OUTPUTS,
    REGISTRY,
    RUN_NAME_PATTERN,
    TRACKIO,
    is_transient_file,
    mirror_name,
)
from zoo.remote.store import RunStore, StoreEntry
from zoo.remote.trackio_merge import MergeResult, TrackioMergeError, media_path_renamed, merge_database
from zoo.runs import atomic_write_json

REGISTRY_MIRROR = ".zoo-remote"
# Which remote databases were merged in which state (size, mtime): unchanged ones are not fetched again.
SYNC_STATE = ".zoo-sync-state.json"
FRESH_MARGIN_S = 300.0


@dataclass(frozen=True)
class Transfer:
    remote_path: str
    local_path: Path
    size: int
    mtime: float


@dataclass(frozen=True)
class TrackioSource:
    """A remote trackio database, its -wal file if any, and the media files beside it."""

    database: StoreEntry
    wal: StoreEntry | None
    media: list[StoreEntry]

    @property
    def fingerprint(self) -> list[float]:
        wal = self.wal
        return [
            self.database.size,
            int(self.database.mtime),
            wal.size if wal else -1,
            int(wal.mtime) if wal else -1,
        ]


@dataclass
class SyncPlan:
    runs: list[str]
    transfers: list[Transfer]
    manifests: dict[str, list[dict[str, float | int | str]]]
    databases: list[TrackioSource]

    @property
    def transfer_bytes(self) -> int:
        return sum(t.size for t in self.transfers)


@dataclass
class SyncReport:
    runs: list[str] = field(default_factory=list)
    files_copied: int = 0
    bytes_copied: int = 0
    merges: list[MergeResult] = field(default_factory=list)
    media_copied: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def rows_added(self) -> int:
        return sum(m.rows_added for m in self.merges)


def local_trackio_dir() -> Path:
    """Where trackio keeps local data: $TRACKIO_DIR, else its default under the Hugging Face cache."""
    if os.environ.get("TRACKIO_DIR"):
        return Path(os.environ["TRACKIO_DIR"])
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "trackio"


def run_selector(patterns: list[str] | None) -> Callable[[str], bool]:
    if not patterns:
        return lambda run: True
    return lambda run: any(fnmatch.fnmatchcase(run, p) for p in patterns)


def _up_to_date(local: Path, entry: StoreEntry) -> bool:
    if not local.is_file():
        return False
    info = local.stat()
    return info.st_size == entry.size and int(info.st_mtime) == int(entry.mtime)


def plan_sync(remote: RunStore, outputs_dir: Path, patterns: list[str] | None = None) -> SyncPlan:
    """What a sync would fetch: one recursive listing of outputs/ and remote/, one of trackio/."""
    selected = run_selector(patterns)
    runs: set[str] = set()
    transfers: list[Transfer] = []
    manifests: dict[str, list[dict[str, float | int | str]]] = {}
    for top, local_subdir in ((OUTPUTS, None), (REGISTRY, REGISTRY_MIRROR)):
        for entry in remote.list(top, recursive=True):
            parts = PurePosixPath(entry.path).parts
            if entry.is_dir or len(parts) < 3:
                continue
            run, relative = parts[1], parts[2:]
            if not RUN_NAME_PATTERN.match(run) or not selected(run):
                continue
            if any(is_transient_file(part) for part in relative):
                continue
            runs.add(run)
            if len(relative) == 1 and relative[0].endswith(CHECKPOINT_SUFFIX + ".sha256"):
                continue  # a checkpoint's hash stays with the checkpoint (read by zoo ckpts download)
            if local_subdir is None and len(relative) == 1 and relative[0].endswith(CHECKPOINT_SUFFIX):
                manifests.setdefault(run, []).append(
                    {"name": relative[0], "size": entry.size, "mtime": entry.mtime}
                )
                continue
            local = outputs_dir / mirror_name(run)
            if local_subdir is not None:
                local = local / local_subdir
            local = local.joinpath(*relative)
            if not _up_to_date(local, entry):
                transfers.append(Transfer(entry.path, local, entry.size, entry.mtime))
    trackio_entries = [e for e in remote.list(TRACKIO, recursive=True) if not e.is_dir]
    databases = [
        TrackioSource(e, _sibling(trackio_entries, e, "-wal"), _media_of(trackio_entries, e))
        for e in trackio_entries
        if e.name.endswith(".db")
    ]
    return SyncPlan(sorted(runs), transfers, manifests, databases)


def _sibling(entries: list[StoreEntry], database: StoreEntry, suffix: str) -> StoreEntry | None:
    return next((e for e in entries if e.path == database.path + suffix), None)


def _media_of(entries: list[StoreEntry], database: StoreEntry) -> list[StoreEntry]:
    """Media files beside a database: `<dir>/media/<project>/<run>/<step>/<file>`."""
    media_root = f"{PurePosixPath(database.path).parent}/media/"
    return [e for e in entries if e.path.startswith(media_root) and not is_transient_file(e.name)]


def execute_sync(
    remote: RunStore,
    plan: SyncPlan,
    outputs_dir: Path,
    trackio_dir: Path,
    patterns: list[str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> SyncReport:
    report = SyncReport(runs=plan.runs)
    for transfer in plan.transfers:
        report.bytes_copied += remote.download(transfer.remote_path, transfer.local_path, on_bytes)
        os.utime(transfer.local_path, (transfer.mtime, transfer.mtime))
        report.files_copied += 1
    synced_at = time.time()
    for run in plan.runs:
        manifest = {
            "source": remote.describe(),
            "run": run,
            "synced_at": synced_at,
            "checkpoints": sorted(plan.manifests.get(run, []), key=lambda c: str(c["name"])),
        }
        atomic_write_json(outputs_dir / mirror_name(run) / MIRROR_MANIFEST, manifest)
    selected = run_selector(patterns)
    state_path = trackio_dir / SYNC_STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    seen = state.setdefault(remote.describe(), {})
    for source in plan.databases:
        key = source.database.path
        folder = PurePosixPath(key).parts
        if len(folder) == 3 and not selected(folder[1]):
            continue  # trackio/<run>/<project>.db of a run not asked for
        local_db = trackio_dir / source.database.name
        if patterns is None and local_db.exists() and _unchanged_since_merge(seen.get(key), source):
            continue
        if _sync_database(remote, source, local_db, selected, report) and patterns is None:
            seen[key] = {"fingerprint": source.fingerprint, "merged_at": synced_at}
    trackio_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, state)
    return report


def _unchanged_since_merge(previous: dict | None, source: TrackioSource) -> bool:
    """Skip a database only when its size/mtime match the merged copy and it was already old then.

    Stores report whole-second mtimes (and a Modal server's clock is not ours): a database
    rewritten at the same size within the same second would look unchanged, so anything
    modified shortly before the last merge is merged again (merging is idempotent).
    """
    if previous is None or previous["fingerprint"] != source.fingerprint:
        return False
    newest = max(source.database.mtime, source.wal.mtime if source.wal else 0.0)
    return newest < previous["merged_at"] - FRESH_MARGIN_S


def _sync_database(
    remote: RunStore,
    source: TrackioSource,
    local_db: Path,
    selected: Callable[[str], bool],
    report: SyncReport,
) -> bool:
    """Merge one remote database and its media; False when it had to be skipped."""
    with tempfile.TemporaryDirectory(prefix="zoo-sync-") as tmp:
        copy = Path(tmp) / source.database.name
        remote.download(source.database.path, copy)
        if source.wal is not None:  # a database open in WAL mode keeps its newest rows in the -wal file
            remote.download(source.wal.path, Path(tmp) / source.wal.name)
        try:
            result = merge_database(copy, local_db, rename=mirror_name, include=selected)
        except TrackioMergeError as exc:
            report.warnings.append(
                f"skipped trackio database {source.database.path}: {exc}; sync again later"
            )
            return False
    report.merges.append(result)
    media_root = PurePosixPath(source.database.path).parent / "media"
    for entry in source.media:
        relative = PurePosixPath(entry.path).relative_to(media_root).as_posix()
        if len(relative.split("/")) < 3 or relative.split("/")[1] not in result.runs:
            continue
        local = local_db.parent / "media" / media_path_renamed(relative, mirror_name)
        if _up_to_date(local, entry):
            continue
        remote.download(entry.path, local)
        os.utime(local, (entry.mtime, entry.mtime))
        report.media_copied += 1
    return True


def read_manifest(mirror_dir: Path) -> dict | None:
    path = mirror_dir / MIRROR_MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())
