"""The Loss interface, and the randomness every loss shares: noise and label dropout.

Noise, times and dropped labels are drawn by the loss from the generator handed in (a
torch.Generator on x.device), never in dataset workers, whose seeded generators would repeat
the same draws in every worker.  `model` is the plain module, never a DDP wrapper:
torch.func.jvp cannot pass through DDP (zoo.distributed), so the trainer synchronises gradients
itself.

A loss is two phases: `draw` takes the step's randomness from the generator, `evaluate`
computes the loss from the batch and those draws with no host synchronisation and no
data-dependent shapes, so a CUDA graph can capture it (zoo.training.step_graph) while the
draws stay on the run's own generator stream.  `loss(model, x, y, generator)` runs both.
"""

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from zoo.config.schema import LossConfig
from zoo.devices import same_device
from zoo.models.base import FlowModel
from zoo.models.embeddings import GuidanceInputs


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    metrics: dict[str, float]  # detached floats, e.g. "loss", "mse"


@dataclass
class Draws:
    """The randomness of one loss evaluation: noise, times, the labels the model sees."""

    noise: Tensor
    times: Any  # (B,) t for flow matching; a TimePair for MeanFlow
    y: Tensor | None  # labels after label dropout (None: unconditional)
    dropped: Tensor  # (B,) bool, True where the label was replaced by the null class
    guidance: GuidanceInputs | None = None  # iMF: the guidance each sample's model call is asked for


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`value` with fn applied to every Tensor in it (through dataclasses, tuples, lists, dicts)."""
    if isinstance(value, Tensor):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value)}
        )
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def flat_tensors(value: Any) -> list[Tensor]:
    """Every Tensor in `value`, in map_tensors' order."""
    found: list[Tensor] = []
    map_tensors(value, lambda t: found.append(t) or t)
    return found


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

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the trainer before each step; objectives with a curriculum (alpha-Flow) use it."""
        del step, total_steps  # the other objectives are the same at every step

    @abstractmethod
    def draw(self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator) -> Draws:
        """The step's randomness, in a fixed order from `generator`; checks the labels."""

    @abstractmethod
    def evaluate(self, model: FlowModel, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss with grad, detached scalar metrics as Tensors); capturable in a CUDA graph."""

    def __call__(
        self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator
    ) -> LossOutput:
        loss, metrics = self.evaluate(model, x, self.draw(model, x, y, generator))
        return LossOutput(loss=loss, metrics=metrics_to_floats(metrics))
