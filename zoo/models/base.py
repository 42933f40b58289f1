"""The interface every zoo network implements."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from zoo.models import dual as D
from zoo.models.embeddings import GuidanceInputs


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
    def forward(
        self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None, guidance: GuidanceInputs | None = None
    ) -> Tensor:
        """z: (B, *data_shape); t, r: (B,) float; y: (B,) long or None; guidance: for models
        conditioned on it (model.guidance_inputs), else None. Returns (B, *data_shape)."""

    @property
    def guidance_conditioned(self) -> bool:
        """Whether guidance is an input of the network (chosen at sampling, no CFG pair of calls)."""
        return False


class RowTangentModel(FlowModel):
    """A FlowModel written as head(trunk(z, emb), emb) with emb = condition(t, r, y, guidance),
    whose trunk and heads also run on Duals (zoo's layers, and the Tensor operations
    zoo.models.dual.Dual has), so one forward can also carry the JVP of a few rows (MeanFlow's
    jvp="fused").

    Two heads share the trunk: "u", the average velocity every sampler uses, and, where the model
    was built with one (model.v_head > 0), "v", iMF's auxiliary instantaneous-velocity head, which
    only training runs.  zoo's networks (MLP, U-Net, DiT) are all of this kind.
    """

    guidance_embed: nn.Module | None

    @abstractmethod
    def condition(
        self, t: Tensor, r: Tensor, y: Tensor | None, guidance: GuidanceInputs | None = None
    ) -> Tensor:
        """(B, emb_dim) conditioning vector from the times, labels and guidance."""

    @abstractmethod
    def trunk(self, z: D.Value, emb: D.Value) -> Any:
        """The features the heads share (Tensors or Duals, or a structure of them)."""

    @abstractmethod
    def head(self, features: Any, emb: D.Value, name: str) -> D.Value:
        """The "u" or "v" head on the trunk's features; must not modify `features`."""

    @property
    @abstractmethod
    def has_v_head(self) -> bool: ...

    @property
    def guidance_conditioned(self) -> bool:
        return self.guidance_embed is not None

    def body(self, z: D.Value, emb: D.Value) -> D.Value:
        """The u-network on the noisy input and the conditioning vector."""
        return self.head(self.trunk(z, emb), emb, "u")

    def forward(
        self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None, guidance: GuidanceInputs | None = None
    ) -> Tensor:
        return self.body(z, self.condition(t, r, y, guidance))

    def check_v_head(self) -> None:
        if not self.has_v_head:
            raise ValueError(
                f"this {type(self).__name__} has no velocity head; build it with model.v_head >= 1 "
                "(loss.kind=imf)"
            )

    def forward_heads(
        self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None, guidance: GuidanceInputs | None = None
    ) -> tuple[Tensor, Tensor]:
        """(u, v): both heads on one trunk pass."""
        self.check_v_head()
        emb = self.condition(t, r, y, guidance)
        features = self.trunk(z, emb)
        return self.head(features, emb, "u"), self.head(features, emb, "v")

    def velocity(
        self, z: Tensor, t: Tensor, y: Tensor | None = None, guidance: GuidanceInputs | None = None
    ) -> Tensor:
        """The v-head's instantaneous velocity at (z, t) (r = t), without running the u-head."""
        self.check_v_head()
        emb = self.condition(t, t, y, guidance)
        return self.head(self.trunk(z, emb), emb, "v")

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
        guidance: GuidanceInputs | None = None,
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
        u, dudt, _ = self.heads_with_row_tangents(z, t, r, y, rows, dz, island, kernels, guidance, False)
        return u, dudt

    def heads_with_row_tangents(
        self,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        y: Tensor | None,
        rows: D.Rows,
        dz: Tensor,
        island: Callable[[], AbstractContextManager],
        kernels: str = "torch",
        guidance: GuidanceInputs | None = None,
        with_v: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """forward_with_row_tangents, plus the v-head's output for the whole batch with autograd
        (with_v; None otherwise).  The v-head runs on the trunk's primal features: no tangent is
        computed for it."""
        if with_v:
            self.check_v_head()
        count = D.row_count(rows, z.shape[0])
        emb = self.condition(t, r, y, guidance)
        if count == 0:
            features = self.trunk(z, emb)
            u = self.head(features, emb, "u")
            v = self.head(features, emb, "v") if with_v else None
            return u, D.upcast(u.detach()[:0]), v  # an empty tangent in the tangents' dtype
        meta = D.RowTangents(rows=rows, batch=z.shape[0], island=island, kernels=kernels)
        with island():
            t_rows, r_rows = meta.at(t), meta.at(r)
            y_rows = None if y is None else y[rows]
            g_rows = None if guidance is None else guidance.rows(rows)
            # The conditioning network is tiny: torch.func.jvp on the rows is simplest.
            _, emb_tangent = torch.func.jvp(
                lambda t_, r_: self.condition(t_, r_, y_rows, g_rows),
                (t_rows, r_rows),
                (torch.ones_like(t_rows), torch.zeros_like(r_rows)),
            )
        dual_emb = D.Dual(emb, emb_tangent, meta)
        features = self.trunk(D.Dual(z, dz, meta), dual_emb)
        out = self.head(features, dual_emb, "u")
        v = self.head(D.map_primal(features), emb, "v") if with_v else None
        if out.tangent is None:  # the output does not depend on (z, t) at all
            return out.primal, D.upcast(out.primal.detach().new_zeros((count, *out.primal.shape[1:]))), v
        return out.primal, out.tangent, v
