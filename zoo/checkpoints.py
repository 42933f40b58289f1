"""Checkpoints: one dict of tensors and plain values, loadable with `weights_only=True`.

    format, run_name, step, model, ema, optimizer, rng, data_state, config, versions, metrics

State dicts are stored without the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes,
so a checkpoint loads into a plain model anywhere.  Writes go to a
temporary file in the same folder and are renamed into place: a crash never leaves a half
checkpoint under the real name.
"""

import hashlib
import io
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import zoo
from zoo.checkpoint_files import DAMAGED_FIX, checksum_path, unreadable_reason, verified_open
from zoo.errors import CheckpointError, MissingCheckpointError
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
    """Write `payload` to `path` crash-safely: the file through a synced temporary file renamed into
    place (until then the previous file stays whole under `path`), then its `.sha256` sidecar.

    The sidecar comes after the file it describes, so a stop between the two leaves a new file
    beside the previous file's sidecar, never a sidecar whose file does not exist yet; a sidecar
    older than its file is recognised as such by load_checkpoint, which then relies on the zip
    archive's own CRCs (see verified_open).
    """
    payload = {"format": CHECKPOINT_FORMAT, "versions": versions(), **payload}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    try:
        atomic_write_bytes(path, data)
        atomic_write_text(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    except OSError as exc:  # a full disk, a quota, a folder made read-only under a live run
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc.strerror or exc}; no partial file is left "
            "and the last complete checkpoint stays loadable"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's payload, verified first (checkpoint_problem)."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(
            f"no checkpoint at {path}; `zoo ckpts` lists the runs and checkpoints there are"
        )
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
