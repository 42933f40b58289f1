"""`zoo ckpts download RUN[/STEP]`: fetch one checkpoint and prove it arrived whole.

Checks, in order: the byte count equals the size the store listed; the file did not change
on the store while it was read (a live run replaces last.pt atomically: then it is fetched
again); a `<name>.sha256` beside it on the store, if any, matches; the file loads as a zoo
checkpoint of the named run.  The file is written under a temporary name and renamed only
after every check passed: a failed download leaves nothing behind.
"""

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import CheckpointError
from zoo.remote.listing import checkpoint_step_from_name
from zoo.remote.store import RunStore, StoreEntry
from zoo.runs import atomic_write_text

MAX_ATTEMPTS = 3


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    sha256: str
    step: int


def parse_checkpoint_spec(spec: str) -> tuple[str, str]:
    """'run' -> (run, 'last.pt'); 'run/1000' or 'run/step_0001000.pt' -> (run, 'step_0001000.pt')."""
    run, _, which = spec.partition("/")
    if not run:
        raise ValueError(f"{spec!r} names no run; use RUN or RUN/STEP (e.g. cifar10-x/20000)")
    if which in ("", "last", "last.pt"):
        return run, "last.pt"
    if which.isdigit():
        return run, f"step_{int(which):07d}.pt"
    if checkpoint_step_from_name(which) is not None:
        return run, which
    raise ValueError(f"{which!r} is not a checkpoint of a run: use a step number, 'last', or step_XXXXXXX.pt")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(store: RunStore, folder: str, name: str) -> StoreEntry:
    entry = store.stat(f"{folder}/{name}")
    if entry is None or entry.is_dir:
        available = sorted(
            e.name for e in store.list(folder) if e.name.endswith(".pt") and not e.name.startswith(".")
        )
        listed = ", ".join(available) if available else "none"
        raise DownloadError(
            f"no checkpoint {name} in {store.describe()}:{folder} (there: {listed}); see `zoo ckpts`"
        )
    return entry


def download_checkpoint(
    store: RunStore,
    folder: str,
    name: str,
    run: str,
    dest: Path,
    on_bytes: Callable[[int], None] | None = None,
    on_restart: Callable[[], None] | None = None,
) -> DownloadResult:
    """Fetch `folder/name` from `store` to `dest`, verified (see the module doc)."""
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    for _ in range(MAX_ATTEMPTS):
        entry = resolve_checkpoint(store, folder, name)
        received = store.download(entry.path, partial, on_bytes)
        after = store.stat(entry.path)
        if after is not None and (after.size, int(after.mtime)) == (entry.size, int(entry.mtime)):
            break
        if on_restart is not None:  # replaced while we read it (a live run saved again)
            on_restart()
    else:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{folder}/{name} kept changing while it was downloaded; try again or pick an archived step"
        )
    try:
        if received != entry.size:
            raise DownloadError(f"{folder}/{name}: received {received} bytes, the store lists {entry.size}")
        digest = sha256_of(partial)
        sidecar = store.stat(f"{entry.path}.sha256")
        # A sidecar not newer than its checkpoint is the previous file's (a save stopped between the
        # two, see save_checkpoint): the archive's CRCs, checked by load_checkpoint, judge it.
        if sidecar is not None and sidecar.mtime > entry.mtime:
            expected = (store.read_text(sidecar.path).split() or ["(an empty sidecar)"])[0]
            if expected != digest:
                raise DownloadError(f"{folder}/{name}: sha256 {digest} differs from the recorded {expected}")
        # torch: only once a file has arrived (`zoo sync` lists without it).
        from zoo.checkpoints import load_checkpoint

        try:
            payload = load_checkpoint(partial)
        except CheckpointError as exc:
            raise DownloadError(f"{folder}/{name} arrived but does not load: {exc}") from exc
        if payload["run_name"] != run:
            raise DownloadError(f"{folder}/{name} belongs to run {payload['run_name']!r}, not {run!r}")
        step = int(payload["step"])
    except DownloadError:
        partial.unlink(missing_ok=True)
        raise
    # The sidecar after its file, as save_checkpoint writes them (see zoo.checkpoint_files).
    os.replace(partial, dest)
    atomic_write_text(dest.with_name(f"{dest.name}.sha256"), f"{digest}  {dest.name}\n")
    return DownloadResult(dest, received, digest, step)
