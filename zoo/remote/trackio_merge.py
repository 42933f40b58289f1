"""Merge one trackio project database into another, idempotently, renaming runs on the way.

Why SQL and not trackio's Python API: trackio binds TRACKIO_DIR at import time, so one process
cannot write two stores through it; the SQLite file is trackio's storage format and the columns
used here (metrics/system_metrics: run_id, timestamp, run_name, step, metrics, log_id;
configs: run_id, run_name, config, created_at) are checked before anything is written.

Idempotency: trackio 0.43 gives every logged row a random `log_id` (a unique index in its
schema).  A row is inserted only when no row with its log_id exists, so merging the same
database twice adds nothing, and merging a newer copy of a database that is still being
logged to adds exactly the new rows.  Rows without a log_id (older trackio) get a
deterministic one derived from their content.  Timestamps are kept as logged.

Records logged again: a retried or resumed run repeats the steps after its last checkpoint and
logs them again, under new log_ids.  A record is a run's row at one step with one set of metric
names (`train/...` at a log step, `eval/...` or `samples` at an evaluation step); of the rows of
one record only the newest is kept, in the merged database whatever order the copies arrive in.
A superseded row is never inserted, so a later sync of the same copy adds nothing either.

Renaming: remote runs are stored locally as `<run>@remote` (see zoo.remote.layout); media
paths inside logged values (`{"_type": "trackio.image", "file_path": "<project>/<run>/..."}`)
are rewritten the same way, and the sync copies the media files to the renamed paths.
The run_id is kept: it is a random id, so it never equals a local run's.
"""

import fcntl
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED_COLUMNS = {
    "metrics": {"run_id", "timestamp", "run_name", "step", "metrics", "log_id"},
    "configs": {"run_id", "run_name", "config", "created_at"},
}
OPTIONAL_COLUMNS = {
    "system_metrics": {"run_id", "timestamp", "run_name", "metrics", "log_id"},
}


class TrackioMergeError(RuntimeError):
    """A database that cannot be merged (incomplete copy, foreign schema)."""


@dataclass
class MergeResult:
    database: str
    runs: set[str] = field(default_factory=set)
    metrics_added: int = 0
    metrics_replaced: int = 0  # rows dropped because the same record was logged again later
    system_metrics_added: int = 0
    configs_written: int = 0

    @property
    def rows_added(self) -> int:
        return self.metrics_added + self.system_metrics_added + self.configs_written


def media_path_renamed(file_path: str, rename: Callable[[str], str]) -> str:
    """'<project>/<run>/<step>/<file>' with the run renamed."""
    parts = file_path.split("/")
    if len(parts) < 3:
        return file_path
    parts[1] = rename(parts[1])
    return "/".join(parts)


def _rename_media(value: Any, rename: Callable[[str], str]) -> Any:
    if isinstance(value, dict):
        renamed = {key: _rename_media(item, rename) for key, item in value.items()}
        if str(value.get("_type", "")).startswith("trackio.") and isinstance(value.get("file_path"), str):
            renamed["file_path"] = media_path_renamed(value["file_path"], rename)
        return renamed
    if isinstance(value, list):
        return [_rename_media(item, rename) for item in value]
    return value


def _renamed_metrics_text(stored: bytes | str, rename: Callable[[str], str]) -> bytes | str:
    """The metrics column with media paths renamed; trackio stores it as JSON bytes (orjson)."""
    text = stored.decode() if isinstance(stored, bytes) else stored
    if "file_path" not in text:  # the common case: plain numbers, keep the stored value exactly
        return stored
    renamed = json.dumps(_rename_media(json.loads(text), rename), separators=(",", ":"))
    return renamed.encode() if isinstance(stored, bytes) else renamed


def _content_log_id(*values: Any) -> str:
    digest = hashlib.sha256("\x1f".join(str(v) for v in values).encode()).hexdigest()[:32]
    return f"zoo-sync-{digest}"


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def check_database(path: Path) -> None:
    """Raise TrackioMergeError unless `path` is a complete trackio database."""
    try:
        conn = sqlite3.connect(path)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
            tables = {table: _columns(conn, table) for table in REQUIRED_COLUMNS}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise TrackioMergeError(
            f"{path.name} is not a readable SQLite database ({exc}); copied mid-write?"
        ) from exc
    if verdict != "ok":
        raise TrackioMergeError(f"{path.name} failed SQLite's integrity check ({verdict}); copied mid-write?")
    for table, needed in REQUIRED_COLUMNS.items():
        missing = needed - tables[table]
        if missing:
            raise TrackioMergeError(
                f"{path.name} is not a trackio database this zoo understands: table {table} lacks "
                f"{sorted(missing)} (trackio version mismatch? zoo expects trackio 0.43-0.4x)"
            )


def _create_like(source: sqlite3.Connection, dest: Path) -> None:
    """A new empty database with the source's schema (the same trackio made both)."""
    conn = sqlite3.connect(dest)
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # what trackio itself uses for local databases
        rows = source.execute(
            "SELECT type, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY CASE type WHEN 'table' THEN 0 ELSE 1 END"
        ).fetchall()
        with conn:
            for _, sql in rows:
                conn.execute(sql)
            version = source.execute("PRAGMA user_version").fetchone()[0]
            conn.execute(f"PRAGMA user_version = {int(version)}")
    finally:
        conn.close()


@contextmanager
def _trackio_lock(db_path: Path) -> Iterator[None]:
    """The same advisory lock trackio takes around writes (`<project>.lock` beside the DB)."""
    with open(db_path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def merge_database(
    source: Path,
    dest: Path,
    rename: Callable[[str], str],
    include: Callable[[str], bool] = lambda run: True,
) -> MergeResult:
    """Insert the rows of `source` missing from `dest` (created if needed); see the module doc."""
    check_database(source)
    result = MergeResult(database=dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(source)
    try:
        optional = [t for t, cols in OPTIONAL_COLUMNS.items() if cols <= _columns(src, t)]
        with _trackio_lock(dest):
            if not dest.exists():
                _create_like(src, dest)
            dst = sqlite3.connect(dest, timeout=60)
            try:
                for table, needed in REQUIRED_COLUMNS.items():
                    missing = needed - _columns(dst, table)
                    if missing:
                        raise TrackioMergeError(f"local {dest} table {table} lacks {sorted(missing)}")
                optional = [t for t in optional if OPTIONAL_COLUMNS[t] <= _columns(dst, t)]
                with dst:  # one transaction: a crash leaves the local database as it was
                    _merge_metrics(src, dst, rename, include, result)
                    if "system_metrics" in optional:
                        _merge_system_metrics(src, dst, rename, include, result)
                    _merge_configs(src, dst, rename, include, result)
            finally:
                dst.close()
    finally:
        src.close()
    return result


def _metric_names(stored: bytes | str) -> tuple[str, ...]:
    return tuple(sorted(json.loads(stored.decode() if isinstance(stored, bytes) else stored)))


def _merge_metrics(
    src: sqlite3.Connection,
    dst: sqlite3.Connection,
    rename: Callable[[str], str],
    include: Callable[[str], bool],
    result: MergeResult,
) -> None:
    # The newest row of each record (run, step, metric names) in the source: rows come in the
    # order they were logged, so a later one replaces an earlier one.
    newest: dict[tuple[str, int, tuple[str, ...]], tuple] = {}
    rows = src.execute("SELECT run_id, timestamp, run_name, step, metrics, log_id FROM metrics ORDER BY id")
    for row in rows:
        run_name, step, metrics = row[2], row[3], row[4]
        if include(run_name):
            result.runs.add(run_name)
            newest[(run_name, step, _metric_names(metrics))] = row
    for (run_name, step, names), (run_id, timestamp, _, _, metrics, log_id) in newest.items():
        log_id = log_id or _content_log_id(run_id, timestamp, step, metrics)
        if dst.execute("SELECT 1 FROM metrics WHERE log_id = ?", (log_id,)).fetchone() is not None:
            continue  # merged before
        local_name = rename(run_name)
        same_record = [
            (row_id, logged)
            for row_id, logged, stored in dst.execute(
                "SELECT id, timestamp, metrics FROM metrics WHERE run_name = ? AND step = ?",
                (local_name, step),
            )
            if _metric_names(stored) == names
        ]
        if any(logged >= timestamp for _, logged in same_record):
            continue  # this database already has the record as logged later (ISO timestamps sort as text)
        dst.executemany("DELETE FROM metrics WHERE id = ?", [(row_id,) for row_id, _ in same_record])
        dst.execute(
            "INSERT INTO metrics (run_id, timestamp, run_name, step, metrics, log_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, timestamp, local_name, step, _renamed_metrics_text(metrics, rename), log_id),
        )
        result.metrics_added += 1
        result.metrics_replaced += len(same_record)


def _merge_system_metrics(
    src: sqlite3.Connection,
    dst: sqlite3.Connection,
    rename: Callable[[str], str],
    include: Callable[[str], bool],
    result: MergeResult,
) -> None:
    before = dst.total_changes
    rows = src.execute("SELECT run_id, timestamp, run_name, metrics, log_id FROM system_metrics ORDER BY id")
    for run_id, timestamp, run_name, metrics, log_id in rows:
        if not include(run_name):
            continue
        log_id = log_id or _content_log_id(run_id, timestamp, metrics)
        dst.execute(
            "INSERT INTO system_metrics (run_id, timestamp, run_name, metrics, log_id) "
            "SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM system_metrics WHERE log_id = ?)",
            (run_id, timestamp, rename(run_name), metrics, log_id, log_id),
        )
    result.system_metrics_added = dst.total_changes - before


def _merge_configs(
    src: sqlite3.Connection,
    dst: sqlite3.Connection,
    rename: Callable[[str], str],
    include: Callable[[str], bool],
    result: MergeResult,
) -> None:
    # One config per run_id; a resumed remote run rewrites its config, so a changed one replaces ours.
    for run_id, run_name, config, created_at in src.execute(
        "SELECT run_id, run_name, config, created_at FROM configs"
    ):
        if not include(run_name):
            continue
        existing = dst.execute("SELECT config FROM configs WHERE run_id = ?", (run_id,)).fetchone()
        if existing is None:
            dst.execute(
                "INSERT INTO configs (run_id, run_name, config, created_at) VALUES (?, ?, ?, ?)",
                (run_id, rename(run_name), config, created_at),
            )
            result.configs_written += 1
        elif existing[0] != config:
            dst.execute(
                "UPDATE configs SET config = ?, run_name = ?, created_at = ? WHERE run_id = ?",
                (config, rename(run_name), created_at, run_id),
            )
            result.configs_written += 1
