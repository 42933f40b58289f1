"""The interface every zoo network implements."""

from abc import ABC, abstractmethod

from torch import Tensor, nn


class FlowModel(nn.Module, ABC):
    """A network u(z, t, r, y) of the average velocity over [r, t] (see zoo.flow).

    Subclasses embed t and the interval h = t - r themselves (no time-as-channel inputs).
    `num_classes == 0` means unconditional; a conditional model reserves label `num_classes`
    as the "no class" token used for classifier-free guidance and label dropout.
    """

    data_shape: tuple[int, ...]
    num_classes: int

    def __init__(self, data_shape: tuple[int, ...], num_classes: int = 0) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes

    @property
    def null_class(self) -> int:
        return self.num_classes

    @abstractmethod
    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        """z: (B, *data_shape); t, r: (B,) float; y: (B,) long or None. Returns (B, *data_shape)."""
