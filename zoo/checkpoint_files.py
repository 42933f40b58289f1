"""Checking a checkpoint file before it is loaded, without torch (`zoo ckpts` marks damaged ones).

A checkpoint is a torch.save zip archive, optionally with a `NAME.sha256` sidecar written after it
(zoo.checkpoints.save_checkpoint).  It is intact when it matches its sidecar or, without one or
with one older than itself, when every record of the archive passes its CRC-32.
"""

import contextlib
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from zoo.errors import CheckpointError


def checksum_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


DAMAGED_FIX = (
    "download it again if it came from a remote run (`zoo ckpts download RUN/STEP`), "
    "or use one of the run's archived step_*.pt"
)
# How often a load starts again when a save replaced the file while it was being checked.
REPLACED_RETRIES = 5


def unreadable_reason(stream: BinaryIO) -> str:
    """Why torch could not read a file, in words (torch's own text runs to a paragraph)."""
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    head = stream.read(4)
    stream.seek(0)
    if head != b"PK\x03\x04":
        return (
            f"is not a checkpoint (a torch.save zip archive starts with PK, this file does not; {size} bytes)"
        )
    if not zipfile.is_zipfile(stream):
        return f"is truncated or damaged (its zip archive has no central directory; {size} bytes)"
    return f"is damaged (a zip archive whose contents torch cannot unpickle; {size} bytes)"


def zip_damage(stream: BinaryIO) -> str | None:
    """Why a checkpoint's zip archive is damaged (a cut archive, a record failing its CRC-32), in the
    words of unreadable_reason, or None when every record reads back intact.  torch.load checks
    none of these CRCs: a flipped byte in a tensor loads silently."""
    try:
        with zipfile.ZipFile(stream) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError):
        return unreadable_reason(stream)
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    return None if bad is None else f"is damaged (its record {bad} fails its CRC check; {size} bytes)"


def file_digest(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 24), b""):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


def checkpoint_problem(path: Path, handle: BinaryIO) -> str | None:
    """Why the open checkpoint `handle` (at `path`) cannot be trusted, or None when it is intact: it
    matches its `.sha256` sidecar or, without one, every record of its zip archive passes its CRC.

    A sidecar older than its file describes the previous file: save_checkpoint renames the new file
    into place before it writes the new sidecar, and stopped in between (killed, disk full) it
    leaves exactly that.  Such a file is judged by its CRCs, like one without a sidecar.
    """
    sidecar = checksum_path(path)
    if sidecar.is_file():
        expected = recorded_digest(sidecar)
        actual = file_digest(handle)
        if actual == expected:
            return None
        stale = sidecar.stat().st_mtime_ns <= os.fstat(handle.fileno()).st_mtime_ns
        if stale and zip_damage(handle) is None:
            return None
        return (
            f"{path} does not match its checksum (sha256 {actual[:16]}..., {sidecar.name} records "
            f"{expected[:16]}...): the file is damaged; {DAMAGED_FIX}"
        )
    damage = zip_damage(handle)
    return None if damage is None else f"{path} {damage}; {DAMAGED_FIX}"


@contextlib.contextmanager
def verified_open(path: Path) -> Iterator[BinaryIO]:
    """The checkpoint opened for reading and checked (checkpoint_problem).  One open file is checked
    and then loaded: a save renames a new file into place, which never changes an open file's bytes.
    A file that was replaced while it was checked (its sidecar may already be the new file's) is
    checked again."""
    for _ in range(REPLACED_RETRIES):
        handle = path.open("rb")
        try:
            problem = checkpoint_problem(path, handle)
        except BaseException:
            handle.close()
            raise
        if problem is None:
            break
        opened = os.fstat(handle.fileno()).st_ino
        handle.close()
        if path.stat().st_ino == opened:  # not replaced meanwhile: the file itself is at fault
            raise CheckpointError(problem)
    else:
        raise CheckpointError(f"{path} was replaced {REPLACED_RETRIES} times while it was read; try again")
    with handle:
        yield handle


def recorded_digest(sidecar: Path) -> str:
    fields = sidecar.read_text().split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise CheckpointError(
            f"{sidecar} is not a sha256 checksum file; delete it to load the checkpoint unchecked"
        )
    return fields[0]
