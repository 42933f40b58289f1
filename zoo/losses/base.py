"""The Loss interface, and the randomness every loss shares: noise and label dropout.

Noise, times and dropped labels are drawn inside the loss from the generator handed in (a
torch.Generator on x.device), never in dataset workers (predecessor defect 4).  `model` is the
plain module, never a DDP wrapper: torch.func.jvp cannot pass through DDP (defect 6), so the
trainer synchronises gradients itself.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from zoo.config.schema import LossConfig
from zoo.devices import same_device
from zoo.models.base import FlowModel


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    metrics: dict[str, float]  # detached floats, e.g. "loss", "mse"


def metrics_to_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """Detached floats with one device->host copy for all of them, not one sync per metric."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    return dict(zip(values.keys(), stacked.tolist(), strict=True))


def draw_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    if not same_device(generator.device, x.device):
        raise ValueError(
            f"the loss generator lives on {generator.device} but the batch on {x.device}; "
            "create it with torch.Generator(device=x.device)"
        )
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def check_labels(model: FlowModel, y: Tensor | None) -> None:
    if model.num_classes > 0 and y is None:
        raise ValueError(
            f"the model is class-conditional ({model.num_classes} classes) but the batch has no labels; "
            "set data.class_conditional = true or build the model with num_classes = 0"
        )
    if model.num_classes == 0 and y is not None:
        raise ValueError(
            "the model is unconditional (num_classes = 0) but the batch has labels; pass y=None "
            "or build a class-conditional model"
        )


def drop_labels(
    model: FlowModel, y: Tensor | None, p: float, batch: int, generator: torch.Generator
) -> tuple[Tensor | None, Tensor]:
    """Replace each label by the null class with probability p (for classifier-free guidance).

    Returns the labels the model sees and the (B,) bool mask of dropped samples (all False for
    unconditional models).
    """
    check_labels(model, y)
    if y is None:
        return None, torch.zeros(batch, dtype=torch.bool, device=generator.device)
    if y.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) to match the batch, got {tuple(y.shape)}")
    dropped = torch.rand(batch, generator=generator, device=generator.device) < p
    return torch.where(dropped, torch.full_like(y, model.null_class), y), dropped


class Loss(ABC):
    """loss(model, x, y, generator) -> LossOutput; x: (B, *data_shape) data, y: (B,) long or None."""

    name: str

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def __call__(self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator) -> LossOutput: ...
