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
None for zero, meta: which batch rows the tangent belongs to and how to compute it).  A model's
forward is written once, for Tensors and Duals alike:

* zoo's layers (zoo.models.layers) take either in `forward`; given a Dual they also propagate
  the tangent: linear maps apply to it, nonlinearities multiply it by their derivative at the
  rows' primal values, norms and attention use their closed forms (zoo.models.tangents);
* a Dual has the arithmetic operators (+, -, *, / with Tensors, numbers or Duals on either
  side; products follow the product rule) and the shape methods the models use (reshape,
  view, flatten, transpose, permute, unsqueeze, chunk, unbind), which keep the batch first;
* torch.cat and the row-wise linear functions in ROW_LINEAR_FUNCTIONS accept Duals.

A Tensor on the left of an operator (`tensor * dual`) reaches the Dual through PyTorch's
`__torch_function__` protocol rather than Python's reflected operators: Tensor.__mul__ would
return NotImplemented to Python, but torch.compile traces `tensor * dual` as a graph op on a
non-Tensor and breaks the graph, whereas it follows `__torch_function__`.

Every op must act on each batch row independently (no batch statistics): true of
convolutions, linears, group and layer norm, attention over tokens, dropout.  Tangents are
computed inside `RowTangents.island` (no grad, and the caller's precision for the JVP: fp32 by
default, with the primal rows it reads upcast), while the primal follows the caller's
autocast.  They are exact: tests compare them with torch.func.jvp on every model.
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Rows = Tensor | slice


def row_count(rows: Rows, batch: int) -> int:
    """How many rows `rows` selects from a batch of `batch`.

    Arithmetic rather than `slice.indices`, which torch.compile cannot trace in every torch
    version (a graph break in every layer).  Only forward slices with non-negative bounds occur
    here (FusedJvp's `slice(0, k)`)."""
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

    def operand(self, x: Tensor | float, ndim: int) -> Tensor | float:
        """A constant factor of a result with `ndim` dims at the rows: a per-sample Tensor (all
        `ndim` dims and B rows) has its rows taken, a broadcast Tensor or a number is used as it
        is.  (Deciding by the first size alone would misread a (C, 1, 1) scale as per-sample
        whenever C == B.)"""
        if not isinstance(x, Tensor):
            return x
        if x.ndim == ndim and x.shape[0] == self.batch:
            return self.at(x)
        return upcast(x.detach())


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are (the JVPs' tangent arithmetic)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# Functions that map each batch row linearly (resampling): a Dual's tangent goes through the
# same call as its primal.
ROW_LINEAR_FUNCTIONS = (F.avg_pool2d, F.interpolate)


def _batch_dim(dim: int, ndim: int) -> bool:
    return dim % ndim == 0


def _shape_arguments(shape: tuple) -> tuple:
    """reshape(2, 3) and reshape((2, 3)) alike, as Tensor.reshape takes them."""
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


@dataclass(frozen=True, eq=False)
class Dual:
    """A (B, ...) activation with the tangent of some of its rows; see the module docstring."""

    primal: Tensor
    tangent: Tensor | None  # None: zero
    meta: RowTangents

    # What a Tensor tells about itself: the primal's.

    @property
    def shape(self) -> torch.Size:
        return self.primal.shape

    @property
    def ndim(self) -> int:
        return self.primal.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.primal.dtype

    @property
    def device(self) -> torch.device:
        return self.primal.device

    # Maps of each row.

    def affine(
        self, fn: Callable[[Tensor], Tensor], linear_part: Callable[[Tensor], Tensor] | None = None
    ) -> "Dual":
        """A row-wise affine map: the primal goes through `fn`, the tangent through its linear
        part `linear_part` (default `fn` itself: a linear map).  Neither may assume the batch
        size."""
        out = fn(self.primal)
        if self.tangent is None:
            return Dual(out, None, self.meta)
        # not `linear_part or fn`: torch.compile cannot branch on a function's truth value
        linear = fn if linear_part is None else linear_part
        with self.meta.island():
            return Dual(out, linear(self.tangent), self.meta)

    def elementwise(
        self, fn: Callable[[Tensor], Tensor], tangent_of: Callable[[Tensor, Tensor], Tensor]
    ) -> "Dual":
        """f applied element-wise; the tangent is tangent_of(dx, x_rows) = f'(x_rows) dx."""
        out = fn(self.primal)
        if self.tangent is None:
            return Dual(out, None, self.meta)
        with self.meta.island():
            rows = self.meta.at(self.primal)
            return Dual(out, tangent_of(self.tangent.to(rows.dtype), rows), self.meta)

    def _restructured(self, fn: Callable[[Tensor], Tensor]) -> "Dual":
        """A map that moves or negates values within each row (a reshape, a transpose, -x):
        applied to the primal and the tangent alike, outside the island (exact in any dtype)."""
        return Dual(fn(self.primal), None if self.tangent is None else fn(self.tangent), self.meta)

    def _split(self, split: Callable[[Tensor], Sequence[Tensor]]) -> list["Dual"]:
        outs = split(self.primal)
        tangents = [None] * len(outs) if self.tangent is None else split(self.tangent)
        return [Dual(p, t, self.meta) for p, t in zip(outs, tangents, strict=True)]

    # Tensor methods; the batch dimension stays first.

    def _row_shape(self, shape: tuple) -> tuple:
        """A new shape's per-row part; its first size must be the batch size B (the tangent keeps
        its own row count)."""
        shape = _shape_arguments(shape)
        if shape[0] != self.shape[0]:
            raise ValueError(
                f"a Dual's new shape must keep the batch size {self.shape[0]} first, got {shape}"
            )
        return shape[1:]

    def reshape(self, *shape: int) -> "Dual":
        row_shape = self._row_shape(shape)
        return self._restructured(lambda a: a.reshape(a.shape[0], *row_shape))

    def view(self, *shape: int) -> "Dual":
        row_shape = self._row_shape(shape)
        return self._restructured(lambda a: a.view(a.shape[0], *row_shape))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "Dual":
        if _batch_dim(start_dim, self.ndim):
            raise ValueError("a Dual cannot flatten its batch dimension: use start_dim >= 1")
        return self._restructured(lambda a: a.flatten(start_dim, end_dim))

    def transpose(self, dim0: int, dim1: int) -> "Dual":
        if _batch_dim(dim0, self.ndim) or _batch_dim(dim1, self.ndim):
            raise ValueError(f"a Dual's batch dimension stays first: cannot transpose({dim0}, {dim1})")
        return self._restructured(lambda a: a.transpose(dim0, dim1))

    def permute(self, *dims: int) -> "Dual":
        dims = _shape_arguments(dims)
        if not _batch_dim(dims[0], self.ndim):
            raise ValueError(f"a Dual's batch dimension stays first: cannot permute{dims}")
        return self._restructured(lambda a: a.permute(*dims))

    def unsqueeze(self, dim: int) -> "Dual":
        if _batch_dim(dim, self.ndim + 1):
            raise ValueError("a Dual's batch dimension stays first: cannot unsqueeze(0)")
        return self._restructured(lambda a: a.unsqueeze(dim))

    def chunk(self, chunks: int, dim: int) -> list["Dual"]:
        if _batch_dim(dim, self.ndim):
            raise ValueError("a Dual is not split along its batch dimension: chunk along dim >= 1")
        return self._split(lambda a: a.chunk(chunks, dim=dim))

    def unbind(self, dim: int) -> list["Dual"]:
        if _batch_dim(dim, self.ndim):
            raise ValueError("a Dual is not split along its batch dimension: unbind along dim >= 1")
        return self._split(lambda a: a.unbind(dim))

    # Arithmetic.  A Tensor on the left arrives through __torch_function__.

    def __add__(self, other: "Value | float") -> "Dual":
        return add(self, other)

    def __radd__(self, other: Tensor | float) -> "Dual":
        return add(other, self)

    def __sub__(self, other: "Value | float") -> "Dual":
        return sub(self, other)

    def __rsub__(self, other: Tensor | float) -> "Dual":
        return sub(other, self)

    def __mul__(self, other: "Value | float") -> "Dual":
        return mul(self, other)

    def __rmul__(self, other: Tensor | float) -> "Dual":
        return mul(other, self)

    def __truediv__(self, other: "Value | float") -> "Dual":
        return div(self, other)

    def __rtruediv__(self, other: Tensor | float) -> "Dual":
        return div(other, self)

    def __neg__(self) -> "Dual":
        return self._restructured(torch.neg)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ROW_LINEAR_FUNCTIONS:
            x, *rest = args
            return x.affine(lambda a: func(a, *rest, **kwargs))
        if func is torch.cat:
            return cat(*args, **kwargs)
        if not kwargs and len(args) == 2:
            if func in (Tensor.add, torch.add):
                return add(*args)
            if func in (Tensor.sub, torch.sub):
                return sub(*args)
            if func in (Tensor.mul, torch.mul):
                return mul(*args)
            if func in (Tensor.div, torch.div):
                return div(*args)
        raise TypeError(
            f"{func.__name__} does not take zoo.models.dual.Dual: a Dual supports "
            "+ - * /, torch.cat, the functions in ROW_LINEAR_FUNCTIONS and zoo.models.layers' modules"
        )


Value = Tensor | Dual


def primal(x: Value | float) -> Tensor | float:
    return x.primal if isinstance(x, Dual) else x


def map_primal(value: object) -> object:
    """`value` (a Dual, Tensor, or a tuple/list of them) with every Dual replaced by its primal."""
    if isinstance(value, (tuple, list)):
        return type(value)(map_primal(v) for v in value)
    return primal(value)


def tangent(x: Value | float) -> Tensor | None:
    return x.tangent if isinstance(x, Dual) else None


def _meta(*values: object) -> RowTangents:
    return next(value.meta for value in values if isinstance(value, Dual))


def _sum_tangents(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _rows(x: Value | float, meta: RowTangents, ndim: int) -> Tensor | float:
    """x at the tangent's rows, as a factor of a result with `ndim` dims."""
    return meta.at(x.primal) if isinstance(x, Dual) else meta.operand(x, ndim)


def add(a: Value | float, b: Value | float) -> Dual:
    meta = _meta(a, b)
    out = primal(a) + primal(b)
    with meta.island():
        return Dual(out, _sum_tangents(tangent(a), tangent(b)), meta)


def sub(a: Value | float, b: Value | float) -> Dual:
    meta = _meta(a, b)
    out = primal(a) - primal(b)
    da, db = tangent(a), tangent(b)
    with meta.island():
        if db is None:
            return Dual(out, da, meta)
        return Dual(out, -db if da is None else da - db, meta)


def mul(a: Value | float, b: Value | float) -> Dual:
    """a * b with the product rule: d(ab) = da b + a db, evaluated at the rows."""
    meta = _meta(a, b)
    out = primal(a) * primal(b)
    da, db = tangent(a), tangent(b)
    with meta.island():
        terms = (
            None if da is None else da * _rows(b, meta, out.ndim),
            None if db is None else _rows(a, meta, out.ndim) * db,
        )
        return Dual(out, _sum_tangents(*terms), meta)


def div(a: Value | float, b: Value | float) -> Dual:
    """a / b with the quotient rule: d(a/b) = (da - (a/b) db) / b, evaluated at the rows."""
    meta = _meta(a, b)
    out = primal(a) / primal(b)
    da, db = tangent(a), tangent(b)
    if da is None and db is None:
        return Dual(out, None, meta)
    with meta.island():
        b_rows = _rows(b, meta, out.ndim)
        if db is None:
            return Dual(out, da / b_rows, meta)
        minus = meta.at(out) * db
        return Dual(out, (-minus if da is None else da - minus) / b_rows, meta)


def cat(values: Sequence[Value], dim: int = 0) -> Dual:
    """torch.cat along a non-batch dimension."""
    meta = _meta(*values)
    if _batch_dim(dim, primal(values[0]).ndim):
        raise ValueError("Duals are not concatenated along the batch dimension: use dim >= 1")
    out = torch.cat([primal(v) for v in values], dim=dim)
    if all(tangent(v) is None for v in values):
        return Dual(out, None, meta)
    with meta.island():
        # Zeros for a part without tangent, in the rows' shape and tangent dtype (no gather needed).
        parts = [
            upcast(p.new_zeros((meta.count, *p.shape[1:]))) if tangent(v) is None else tangent(v)
            for v, p in ((v, primal(v)) for v in values)
        ]
        return Dual(out, torch.cat(parts, dim=dim), meta)


__all__ = [
    "ROW_LINEAR_FUNCTIONS",
    "Dual",
    "RowTangents",
    "Rows",
    "Value",
    "primal",
    "row_count",
    "tangent",
    "upcast",
]
