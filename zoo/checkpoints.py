"""Checkpoints: one dict of tensors and plain values, loadable with `weights_only=True`.

    format, run_name, step, model, ema, optimizer, rng, data_state, config, versions, metrics

State dicts are stored without the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes,
so a checkpoint loads into a plain model anywhere (predecessor defect 7).  Writes go to a
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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; `zoo ckpts` lists the runs and checkpoints there are")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt, truncated, or not a zoo file): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a zoo checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return payload
