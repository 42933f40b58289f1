"""Forward passes that carry a tangent for a few rows of the batch: MeanFlow's fused JVP.

MeanFlow needs, for the k = ratio * B samples with r != t, the derivative du/dt of the network
along (v, 1, 0); the other B - k samples need only the prediction u.  `torch.func.jvp` must
carry a tangent for every row it runs on, so the other modes either split the batch (a JVP on k
rows + a forward on B - k: two half-empty passes, two backward graphs, small-batch kernels) or
run the JVP on all B rows (tangent work on rows whose tangent is never used).  Here one forward
runs over the whole batch with autograd, exactly as flow matching's, and each layer also
computes the tangent of just the k rows, without autograd:

    cost ~ FM step + tangent(k rows),   memory ~ FM step + the k rows' tangents alive at once
                                        (a layer's, plus a U-Net's skip connections')

A `Dual` is (primal: the (B, ...) activation with its autograd graph, tangent: (k, ...) or
None for zero, rows: which batch rows the tangent belongs to).  The functions here accept a
Tensor or a Dual: given Tensors they are the plain layer (so a model's single forward serves
the ordinary call, torch.func.jvp and the fused pass); given Duals they also propagate the
tangent: linear maps apply to it, nonlinearities multiply it by their derivative at the rows'
primal values, and products follow the product rule.  Every op must act on each batch row
independently (no batch statistics): true of convolutions, linears, group and layer norm,
attention over tokens, dropout.

Tangents are computed inside `RowTangents.island` (no grad, and the caller's precision for the
JVP: fp32 by default, with the primal rows it reads upcast), while the primal follows the
caller's autocast.  They are exact: tests compare them with torch.func.jvp on every model.
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.models import group_norm_tangent_kernel, layers

Rows = Tensor | slice


def row_count(rows: Rows, batch: int) -> int:
    """How many rows `rows` selects from a batch of `batch`.

    Arithmetic rather than `slice.indices`, which torch.compile cannot trace in every torch
    (dynamo of torch 2.11 refuses it: a graph break in every layer).  Only forward slices with
    non-negative bounds occur here (FusedJvp's `slice(0, k)`)."""
    if not isinstance(rows, slice):
        return rows.shape[0]
    start, stop = rows.start or 0, batch if rows.stop is None else min(rows.stop, batch)
    if rows.step not in (None, 1) or start < 0 or stop < 0:
        raise ValueError(f"row slices must be forward with non-negative bounds, got {rows}")
    return max(stop - start, 0)


@dataclass(frozen=True)
class RowTangents:
    """What every Dual of one fused pass shares: the rows and how to compute tangents.

    rows: (k,) long indices into the batch, or a slice.  A slice (MeanFlow's fused mode puts the
    r != t samples first, zoo.losses.jvp.FusedJvp) makes every row read a view: no gather
    kernel per layer.
    """

    rows: Rows
    batch: int  # B
    island: Callable[[], AbstractContextManager]  # no grad + the JVP's precision
    kernels: str = "torch"  # "triton": group-norm tangents by zoo.models.group_norm_tangent_kernel

    @property
    def count(self) -> int:
        return row_count(self.rows, self.batch)

    def at(self, x: Tensor) -> Tensor:
        """The rows of a per-sample (B, ...) tensor, detached, upcast from fp16/bf16 (tangent
        arithmetic is wider)."""
        if x.ndim == 0 or x.shape[0] != self.batch:
            raise ValueError(
                f"expected a per-sample tensor with {self.batch} rows, got shape {tuple(x.shape)}"
            )
        return upcast(x.detach()[self.rows])

    def operand(self, x: Tensor, ndim: int) -> Tensor:
        """A plain Tensor factor of a result with `ndim` dims: per-sample (its rows taken) when it
        has all `ndim` dims and B rows, else a broadcast constant used as it is.  (Deciding by
        the first size alone would misread a (C, 1, 1) scale as per-sample whenever C == B.)"""
        if x.ndim == ndim and x.shape[0] == self.batch:
            return self.at(x)
        return upcast(x.detach())


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are (the JVPs' tangent arithmetic)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass(frozen=True)
class Dual:
    primal: Tensor
    tangent: Tensor | None  # None: zero
    meta: RowTangents


Value = Tensor | Dual


def _meta(*values: object) -> RowTangents | None:
    for value in values:
        if isinstance(value, Dual):
            return value.meta
    return None


def primal(x: Value) -> Tensor:
    return x.primal if isinstance(x, Dual) else x


def tangent(x: Value) -> Tensor | None:
    return x.tangent if isinstance(x, Dual) else None


def lift(
    fn: Callable[[Tensor], Tensor], x: Value, tangent_fn: Callable[[Tensor], Tensor] | None = None
) -> Value:
    """A row-wise affine map: the primal goes through `fn`, the tangent through its linear part
    `tangent_fn` (default `fn` itself: reshape, transpose, pooling, nearest upsampling, scaling
    by a constant).  Neither may assume the batch size."""
    if not isinstance(x, Dual):
        return fn(x)
    out = fn(x.primal)
    if x.tangent is None:
        return Dual(out, None, x.meta)
    linear_part = (
        fn if tangent_fn is None else tangent_fn
    )  # not `or`: torch 2.11's dynamo cannot branch on a function
    with x.meta.island():
        return Dual(out, linear_part(x.tangent), x.meta)


def _sum_tangents(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def add(a: Value | float, b: Value | float) -> Value:
    meta = _meta(a, b)
    out = primal(a) + primal(b)
    if meta is None:
        return out
    with meta.island():
        return Dual(out, _sum_tangents(tangent(a), tangent(b)), meta)


def mul(a: Value, b: Value) -> Value:
    """a * b with the product rule: d(ab) = da b + a db, evaluated at the rows."""
    meta = _meta(a, b)
    out = primal(a) * primal(b)
    if meta is None:
        return out
    da, db = tangent(a), tangent(b)

    def rows(x: Value) -> Tensor:
        return meta.at(x.primal) if isinstance(x, Dual) else meta.operand(x, out.ndim)

    with meta.island():
        terms = [None if da is None else da * rows(b), None if db is None else rows(a) * db]
        return Dual(out, _sum_tangents(*terms), meta)


def cat(values: Sequence[Value], dim: int) -> Value:
    """torch.cat along a non-batch dimension."""
    meta = _meta(*values)
    out = torch.cat([primal(v) for v in values], dim=dim)
    if meta is None:
        return out
    if all(tangent(v) is None for v in values):
        return Dual(out, None, meta)
    with meta.island():
        # Zeros for a part without tangent, in the rows' shape and tangent dtype (no gather needed).
        parts = [
            upcast(p.new_zeros((meta.count, *p.shape[1:]))) if tangent(v) is None else tangent(v)
            for v, p in ((v, primal(v)) for v in values)
        ]
        return Dual(out, torch.cat(parts, dim=dim), meta)


def _split(x: Value, split: Callable[[Tensor], Sequence[Tensor]]) -> list[Value]:
    """A split along a non-batch dimension, applied to the primal and the tangent alike."""
    if not isinstance(x, Dual):
        return list(split(x))
    outs = split(x.primal)
    tangents = [None] * len(outs) if x.tangent is None else split(x.tangent)
    return [Dual(p, t, x.meta) for p, t in zip(outs, tangents, strict=True)]


def chunk(x: Value, chunks: int, dim: int) -> list[Value]:
    """torch.chunk along a non-batch dimension."""
    return _split(x, lambda a: a.chunk(chunks, dim=dim))


def unbind(x: Value, dim: int) -> list[Value]:
    """torch.unbind along a non-batch dimension (here: which of the stacked q, k, v)."""
    return _split(x, lambda a: a.unbind(dim))


# ----------------------------------------------------------------------------- nonlinearities


def _pointwise(
    x: Value, forward: Callable[[Tensor], Tensor], derivative_times: Callable[[Tensor, Tensor], Tensor]
) -> Value:
    """f(x) element-wise; the tangent is derivative_times(dx, x_rows) = f'(x_rows) * dx."""
    if not isinstance(x, Dual):
        return forward(x)
    out = forward(x.primal)
    if x.tangent is None:
        return Dual(out, None, x.meta)
    with x.meta.island():
        rows = x.meta.at(x.primal)
        return Dual(out, derivative_times(x.tangent.to(rows.dtype), rows), x.meta)


def silu(x: Value) -> Value:
    # silu_backward(g, x) = g * silu'(x), in one kernel.
    return _pointwise(x, F.silu, torch.ops.aten.silu_backward)


def gelu_tanh(x: Value) -> Value:
    return _pointwise(
        x,
        lambda a: F.gelu(a, approximate="tanh"),
        lambda dx, rows: torch.ops.aten.gelu_backward(dx, rows, approximate="tanh"),
    )


# ----------------------------------------------------------------------------- layers


def linear(module: nn.Linear, x: Value) -> Value:
    """The bias has no tangent: d(Wx + b) = W dx."""
    return lift(module, x, lambda dx: F.linear(dx, module.weight.to(dx.dtype)))


def conv2d(module: layers.Conv2d, x: Value) -> Value:
    m = module
    return lift(
        m, x, lambda dx: F.conv2d(dx, m.weight.to(dx.dtype), None, m.stride, m.padding, m.dilation, m.groups)
    )


def _normalization(
    module: layers.GroupNorm | layers.LayerNorm,
    x: Value,
    tangent_of: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
) -> Value:
    """A norm layer with its saved statistics; tangent_of(x_rows, dx, mean_rows, rstd_rows)."""
    if not isinstance(x, Dual):
        return module(x)
    # The fp32 copy the norm computes on under autocast: its rows are views, not casts.
    x_in = layers.norm_input(x.primal)
    out, mean, rstd = module.normalize(x_in)
    if x.tangent is None:
        return Dual(out, None, x.meta)
    meta = x.meta
    with meta.island():
        rows = meta.at(x_in)
        return Dual(out, tangent_of(rows, x.tangent.to(rows.dtype), meta.at(mean), meta.at(rstd)), meta)


def group_norm(module: layers.GroupNorm, x: Value) -> Value:
    groups = module.num_groups
    use_kernel = isinstance(x, Dual) and x.meta.kernels == "triton"

    def tangent_of(rows: Tensor, dx: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
        if use_kernel and group_norm_tangent_kernel.applies(rows):
            return group_norm_tangent_kernel.group_norm_tangent(rows, dx, module.weight, mean, rstd, groups)
        n = rows.shape[0]
        weight = module.weight.to(rows.dtype)
        return layers.group_norm_tangent(
            rows, dx, weight, mean.reshape(n, groups, 1), rstd.reshape(n, groups, 1), groups
        )

    return _normalization(module, x, tangent_of)


def layer_norm(module: layers.LayerNorm, x: Value) -> Value:
    def tangent_of(rows: Tensor, dx: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
        weight = None if module.weight is None else module.weight.to(rows.dtype)
        return layers.layer_norm_tangent(rows, dx, weight, mean, rstd)

    return _normalization(module, x, tangent_of)


def dropout(module: nn.Dropout, x: Value) -> Value:
    """The tangent is masked and scaled like the primal, with the same mask."""
    if not isinstance(x, Dual):
        return module(x)
    if not module.training or module.p == 0.0:
        return x
    out, keep = torch.native_dropout(x.primal, module.p, True)
    if x.tangent is None:
        return Dual(out, None, x.meta)
    with x.meta.island():
        # tangent * mask * scale in one kernel, rounded once: PyTorch's own forward-AD rule for
        # dropout, bit for bit in every dtype (p = 1 keeps nothing: scale 0, as torch's).
        scale = 0.0 if module.p == 1.0 else 1.0 / (1.0 - module.p)
        return Dual(out, torch.ops.aten.native_dropout_backward(x.tangent, keep[x.meta.rows], scale), x.meta)


def attention(q: Value, k: Value, v: Value) -> Value:
    """softmax(q k^T / sqrt(d)) v over (batch, heads, tokens, head_dim): primal through SDPA."""
    meta = _meta(q, k, v)
    out = layers.attention(primal(q), primal(k), primal(v))
    if meta is None:
        return out
    if all(tangent(a) is None for a in (q, k, v)):
        return Dual(out, None, meta)
    with meta.island():
        qr, kr, vr, outr = (meta.at(primal(a)) for a in (q, k, v, out))
        dq, dk, dv = (
            torch.zeros_like(r) if tangent(a) is None else tangent(a).to(r.dtype)
            for a, r in ((q, qr), (k, kr), (v, vr))
        )
        return Dual(out, layers.attention_tangent(qr, kr, vr, outr, dq, dk, dv), meta)


def multi_head_attention(module: layers.Attention, x: Value) -> Value:
    """layers.Attention's forward, (B, N, dim) -> (B, N, dim), on Tensors or Duals."""
    n, dim = primal(x).shape[1:]
    heads = module.heads
    qkv = lift(
        lambda a: a.reshape(a.shape[0], n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4),
        linear(module.qkv, x),
    )
    out = attention(*unbind(qkv, 0))
    return linear(module.proj, lift(lambda a: a.transpose(1, 2).reshape(a.shape[0], n, dim), out))


def scale(x: Value, factor: float) -> Value:
    return lift(lambda a: a * factor, x)


__all__ = [
    "Dual",
    "RowTangents",
    "add",
    "attention",
    "cat",
    "chunk",
    "conv2d",
    "dropout",
    "gelu_tanh",
    "group_norm",
    "layer_norm",
    "lift",
    "linear",
    "mul",
    "multi_head_attention",
    "primal",
    "scale",
    "silu",
    "tangent",
    "unbind",
    "upcast",
]
