"""The interface every zoo network implements."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from zoo.models import dual as D


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


class RowTangentModel(FlowModel):
    """A FlowModel written as body(z, condition(t, r, y)) whose body also runs on Duals (zoo's
    layers, and the Tensor operations zoo.models.dual.Dual has), so one forward can also carry
    the JVP of a few rows (MeanFlow's jvp="fused").

    zoo's networks (MLP, U-Net, DiT) are all of this kind.
    """

    @abstractmethod
    def condition(self, t: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
        """(B, emb_dim) conditioning vector from the times and labels."""

    @abstractmethod
    def body(self, z: D.Value, emb: D.Value) -> D.Value:
        """The network on the noisy input and the conditioning vector (Tensors or Duals)."""

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        return self.body(z, self.condition(t, r, y))

    def forward_with_row_tangents(
        self,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        y: Tensor | None,
        rows: D.Rows,
        dz: Tensor,
        island: Callable[[], AbstractContextManager],
        kernels: str = "torch",
    ) -> tuple[Tensor, Tensor]:
        """(u for the whole batch with autograd, du/dt for `rows` without), du/dt along (dz, 1, 0)
        for (z, t, r), i.e. the JVP of the model restricted to those rows.

        rows: (k,) long batch indices or a slice of the batch; dz: (k, *data_shape).  `island()`
        is entered around every tangent computation: it must disable grad and set the tangents'
        precision.  kernels: "triton" computes group-norm tangents with zoo's Triton kernels
        (zoo.models.group_norm_tangent_kernel) where they apply.

        The tangent is evaluated at this forward's activations: under bf16/fp16 autocast those
        are reduced-precision values (du/dt has a bf16-size error, as a JVP run wholly in bf16:
        EXPERIMENT_LOG.md, "which JVP modes earn their place"), whatever the island's precision.
        """
        count = D.row_count(rows, z.shape[0])
        if count == 0:
            u = self(z, t, r, y)
            return u, D.upcast(u.detach()[:0])  # an empty tangent in the tangents' dtype
        emb = self.condition(t, r, y)
        meta = D.RowTangents(rows=rows, batch=z.shape[0], island=island, kernels=kernels)
        with island():
            t_rows, r_rows = meta.at(t), meta.at(r)
            y_rows = None if y is None else y[rows]
            # The conditioning network is tiny: torch.func.jvp on the rows is simplest.
            _, emb_tangent = torch.func.jvp(
                lambda t_, r_: self.condition(t_, r_, y_rows),
                (t_rows, r_rows),
                (torch.ones_like(t_rows), torch.zeros_like(r_rows)),
            )
        out = self.body(D.Dual(z, dz, meta), D.Dual(emb, emb_tangent, meta))
        if out.tangent is None:  # the output does not depend on (z, t) at all
            return out.primal, D.upcast(out.primal.detach().new_zeros((count, *out.primal.shape[1:])))
        return out.primal, out.tangent
