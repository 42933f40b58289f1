"""Loading a trained model back from a checkpoint, for sampling and evaluation."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoints import DAMAGED_FIX, load_checkpoint
from zoo.config.loading import ConfigError, config_from_dict
from zoo.config.schema import MAX_SAMPLE_BYTES, ZooConfigBody
from zoo.errors import CheckpointError, NonFiniteCheckpointError
from zoo.models import build_model
from zoo.models.base import FlowModel
from zoo.solvers.samplers import Guidance, resolve_guidance

# What sampling and evaluation read from a checkpoint; resuming reads the rest training writes.
MODEL_KEYS = ("config", "data_shape", "num_classes", "step", "model", "ema")
RESUME_KEYS = (
    *MODEL_KEYS,
    *("run_name", "ema_updates", "optimizer", "rng", "data_state", "micro_batches", "device_type"),
    *("jvp_mode", "metrics"),
)


def check_payload(payload: dict[str, Any], path: str | Path, keys: Sequence[str]) -> None:
    """A checkpoint that passed its format check but lacks what is about to be read from it."""
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(
            f"{path} is an incomplete zoo checkpoint (it has no {', '.join(missing)}); {DAMAGED_FIX}"
        )


def check_sample_count(n: int, data_shape: Sequence[int]) -> None:
    """`n` samples of `data_shape` fit the bound on what `zoo sample` holds and writes at once."""
    per_sample = 4 * math.prod(data_shape)
    if n * per_sample > MAX_SAMPLE_BYTES:
        most = MAX_SAMPLE_BYTES // per_sample
        raise ConfigError(
            f"--n {n}: {n} samples of shape {tuple(data_shape)} would take {n * per_sample / 2**30:.1f} GiB "
            f"(at most {MAX_SAMPLE_BYTES / 2**30:g} GiB); pass --n {most} or less and run again with other "
            "--seed values for more"
        )


@dataclass
class LoadedModel:
    model: FlowModel
    cfg: ZooConfigBody
    step: int
    path: Path
    payload: dict[str, Any]

    @property
    def is_meanflow(self) -> bool:
        return self.cfg.loss.average_velocity


def load_model(path: str | Path, device: torch.device, use_ema: bool = True) -> LoadedModel:
    """The EMA weights by default: they are what training evaluates and what users sample."""
    payload = load_checkpoint(path, map_location="cpu")
    check_payload(payload, path, MODEL_KEYS)
    check_finite_weights(path, payload)
    cfg = config_from_dict(payload["config"])
    model = build_model(cfg.model, tuple(payload["data_shape"]), int(payload["num_classes"]))
    model.load_state_dict(payload["ema"] if use_ema else payload["model"])
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, cfg=cfg, step=int(payload["step"]), path=Path(path), payload=payload)


def check_finite_weights(path: str | Path, payload: dict[str, Any]) -> None:
    """Refuse weights (model or EMA) holding NaN or inf: their samples and scores mean nothing."""
    for which in ("model", "ema"):
        bad = [name for name, t in payload[which].items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise NonFiniteCheckpointError(
                f"{path} holds non-finite {which} weights ({bad[0]} and {len(bad) - 1} more tensors): "
                f"the run diverged before step {payload['step']}; "
                "use an earlier checkpoint (zoo ckpts lists them)"
            )


def resolve_run_guidance(
    loaded: LoadedModel, scale: float | None, interval: tuple[float, float] | None
) -> Guidance:
    """zoo.solvers.samplers.resolve_guidance for a loaded run (iMF runs: checked against the
    scales they were trained on); a refusal is a ConfigError naming the option."""
    omega_max = loaded.cfg.loss.omega_max if loaded.cfg.loss.kind == "imf" else None
    try:
        return resolve_guidance(loaded.model, loaded.cfg.eval, scale, interval, omega_max)
    except ValueError as exc:
        option = "--guidance-interval" if "interval" in str(exc) else "--guidance"
        raise ConfigError(f"{option}: {exc}") from None
