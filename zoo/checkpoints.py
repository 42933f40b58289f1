"""Checkpoints: one dict of tensors and plain values, loadable with `weights_only=True`.

    format, run_name, step, model, ema, optimizer, rng, data_state, config, versions, metrics

State dicts are stored without the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes,
so a checkpoint loads into a plain model anywhere.  Writes go to a
temporary file in the same folder and are renamed into place: a crash never leaves a half
checkpoint under the real name.
"""

import contextlib
import hashlib
import io
import os
import platform
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import zoo
from zoo.errors import CheckpointError
from zoo.runs import atomic_write_bytes, atomic_write_text

CHECKPOINT_FORMAT = "zoo-checkpoint/1"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop compile/DDP wrapper prefixes from every key."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
            key = key.replace("._orig_mod.", ".")
        cleaned[key] = value
    return cleaned


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile / DDP wrappers."""
    # Imported here: torch._dynamo costs a second at start-up, and only compiled models need it.
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def versions() -> dict[str, str]:
    return {"zoo": zoo.__version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "versions": versions(), **payload}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    # The hash goes first: a reader that sees the new checkpoint also sees its hash
    # (`zoo ckpts download` verifies against it).
    atomic_write_text(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    atomic_write_bytes(path, data)


def checksum_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's payload, verified against its `.sha256` sidecar when it has one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; `zoo ckpts` lists the runs and checkpoints there are"
        )
    # One open file: hashed in chunks, then loaded from the same handle.  A save replaces the file
    # by renaming a new one into place, which never changes an open file's bytes: what torch
    # loads is exactly what was checked, in constant extra memory.
    with verified_open(path) as source:
        try:
            payload = torch.load(source, map_location=map_location, weights_only=True)
        except (
            Exception
        ) as exc:  # torch raises many types (RuntimeError, OSError, KeyError, ...) for bad files
            raise CheckpointError(f"{path} {unreadable_reason(source)}; {DAMAGED_FIX}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a zoo checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return payload


DAMAGED_FIX = (
    "download it again if it came from a remote run (`zoo ckpts download RUN/STEP`), "
    "or use one of the run's archived step_*.pt"
)
# How long a load waits for a save in progress (see verified_open) to finish.
SAVE_WAIT_S = 120.0


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


def file_digest(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 24), b""):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


@contextlib.contextmanager
def verified_open(path: Path) -> Iterator[BinaryIO]:
    """The checkpoint opened for reading, checked against its sidecar when it has one.

    save_checkpoint writes the sidecar first, then the checkpoint through a temporary file that is
    renamed into place.  A mismatch while that temporary file is being written is a save in
    progress (a run writing last.pt while it is sampled from), not damage: wait for the new file.
    """
    sidecar = checksum_path(path)
    deadline = time.monotonic() + SAVE_WAIT_S
    while True:
        handle = path.open("rb")
        try:
            mismatch = None if not sidecar.is_file() else checksum_mismatch(path, handle, sidecar, deadline)
        except BaseException:
            handle.close()
            raise
        if mismatch is None:
            break
        handle.close()
        if mismatch == "retry":
            continue
        raise CheckpointError(mismatch)
    with handle:
        yield handle


def checksum_mismatch(path: Path, handle: BinaryIO, sidecar: Path, deadline: float) -> str | None:
    """None when the open file matches its sidecar; "retry" when a save replaced it meanwhile (or is
    replacing it before `deadline`); else the error message."""
    expected = recorded_digest(sidecar)
    before = os.fstat(handle.fileno())
    actual = file_digest(handle)
    if actual == expected:
        return None
    if time.monotonic() < deadline:
        # A save renamed a new file into place while this one was hashed (the sidecar is written
        # first, so an old file can meet a new sidecar), or is about to.
        if path.stat().st_ino != before.st_ino or recorded_digest(sidecar) != expected:
            return "retry"
        if save_in_progress(path) and wait_for_replacement(path, before, deadline):
            return "retry"
    why = (
        f"a save is still writing it after {SAVE_WAIT_S:g} s; try again when the run has saved"
        if save_in_progress(path)
        else f"the file is damaged; {DAMAGED_FIX}"
    )
    return (
        f"{path} does not match its checksum (sha256 {actual[:16]}..., {sidecar.name} records "
        f"{expected[:16]}...): {why}"
    )


def save_in_progress(path: Path) -> bool:
    """Whether a save's temporary file for `path` (zoo.runs.atomic_write_bytes) is being written:
    one changed in the last minute.  Older ones are left by killed saves and mean nothing."""
    now = time.time()
    for temporary in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            if now - temporary.stat().st_mtime < 60:
                return True
        except FileNotFoundError:  # renamed into place since the listing
            return True
    return False


def recorded_digest(sidecar: Path) -> str:
    fields = sidecar.read_text().split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise CheckpointError(
            f"{sidecar} is not a sha256 checksum file; delete it to load the checkpoint unchecked"
        )
    return fields[0]


def wait_for_replacement(path: Path, before: os.stat_result, deadline: float) -> bool:
    """Whether `path` was replaced (another inode or mtime) before `deadline`."""
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = path.stat()
        if (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
            return True
    return False
