"""Loading a trained model back from a checkpoint, for sampling and evaluation."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoints import load_checkpoint
from zoo.config.loading import config_from_dict
from zoo.config.schema import ZooConfigBody
from zoo.models import build_model
from zoo.models.base import FlowModel


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
    cfg = config_from_dict(payload["config"])
    model = build_model(cfg.model, tuple(payload["data_shape"]), int(payload["num_classes"]))
    model.load_state_dict(payload["ema"] if use_ema else payload["model"])
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, cfg=cfg, step=int(payload["step"]), path=Path(path), payload=payload)
