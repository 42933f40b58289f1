"""A run store: a tree of files with the Modal Volume's layout, local or remote.

Sync, listing, cleaning and downloads are written once against `RunStore`.  `LocalDirStore`
is a plain directory (tests use one to play the Volume; `--volume-dir` uses one for a copy of
the volume); `zoo.remote.modal_app.ModalVolumeStore` is the real Volume (zoo.remote.remote_store
opens either).  Paths are POSIX strings relative to the store root ("outputs/run/last.pt").
"""

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from zoo.runs import atomic_write_bytes, writer_gone, writer_of, writer_text

CHUNK = 1 << 20


def write_chunks_atomically(
    chunks: Iterable[bytes], dest: Path, on_bytes: Callable[[int], None] | None = None
) -> int:
    """Stream `chunks` into `dest` through a synced temporary file, so `dest` is whole or absent
    (a crash or an error mid-stream leaves no partial file).  Returns the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    total = 0
    try:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                total += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return total


class StoreError(RuntimeError):
    """A store operation that cannot be done (missing file, unreachable volume, ...)."""


@dataclass(frozen=True)
class StoreEntry:
    path: str
    size: int
    mtime: float
    is_dir: bool

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


class RunStore(ABC):
    """Files under one root. `label` says where they are in tables ("local", "remote")."""

    label: str

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for messages ("modal volume 'zoo-runs'", "/path")."""

    @abstractmethod
    def list(self, prefix: str, recursive: bool = False) -> list[StoreEntry]:
        """Entries under `prefix` (files and folders); [] when `prefix` does not exist."""

    @abstractmethod
    def stat(self, path: str) -> StoreEntry | None:
        """The entry of one file, or None when there is none."""

    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """A whole (small) file; StoreError when missing."""

    @abstractmethod
    def download(self, path: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> int:
        """Stream a file to `dest` (written atomically); returns the number of bytes."""

    @abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Create or replace a file."""

    @abstractmethod
    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete a file (or a folder with `recursive`)."""

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode()

    def writer(self, folder: str) -> str | None:
        """The process training the run in `folder`, in words, when the store can tell (a local
        folder can, from the run's lock: zoo.runs.RunLock; the Modal Volume cannot)."""
        return None

    def writer_gone(self, folder: str, heartbeat: dict[str, Any] | None) -> str | None:
        """Why the writer a "running" heartbeat names is certainly gone, when the store can tell
        (zoo.runs.writer_gone: a local folder on this machine); None otherwise."""
        return None


class LocalDirStore(RunStore):
    def __init__(self, root: str | Path, label: str = "local") -> None:
        self.root = Path(root)
        self.label = label

    def describe(self) -> str:
        return str(self.root)

    def _path(self, path: str) -> Path:
        relative = PurePosixPath(path)
        if relative.is_absolute() or ".." in relative.parts:
            raise StoreError(f"store path {path!r} must be relative and stay inside {self.root}")
        return self.root.joinpath(*relative.parts)

    def _entry(self, path: Path) -> StoreEntry:
        info = path.stat()
        return StoreEntry(
            path=path.relative_to(self.root).as_posix(),
            size=info.st_size,
            mtime=info.st_mtime,
            is_dir=path.is_dir(),
        )

    def list(self, prefix: str, recursive: bool = False) -> list[StoreEntry]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        children = base.rglob("*") if recursive else base.iterdir()
        entries = []
        for child in children:
            # A live writer renames temporaries away between listing and stat: skip what vanished.
            if child.exists():
                entries.append(self._entry(child))
        return sorted(entries, key=lambda e: e.path)

    def stat(self, path: str) -> StoreEntry | None:
        target = self._path(path)
        return self._entry(target) if target.exists() else None

    def read_bytes(self, path: str) -> bytes:
        target = self._path(path)
        if not target.is_file():
            raise StoreError(f"no file {path} in {self.describe()}")
        return target.read_bytes()

    def writer(self, folder: str) -> str | None:
        holder = writer_of(self._path(folder))
        return None if holder is None else writer_text(holder)

    def writer_gone(self, folder: str, heartbeat: dict[str, Any] | None) -> str | None:
        return writer_gone(self._path(folder), heartbeat)

    def download(self, path: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> int:
        source = self._path(path)
        if not source.is_file():
            raise StoreError(f"no file {path} in {self.describe()}")
        with open(source, "rb") as reader:
            return write_chunks_atomically(iter(lambda: reader.read(CHUNK), b""), dest, on_bytes)

    def write_bytes(self, path: str, data: bytes) -> None:
        atomic_write_bytes(self._path(path), data)

    def remove(self, path: str, recursive: bool = False) -> None:
        target = self._path(path)
        if target.is_dir():
            if not recursive:
                raise StoreError(f"{path} is a folder; removing it needs recursive=True")
            shutil.rmtree(target)
        else:
            target.unlink()
