"""zoo's layers: the PyTorch modules with exact, cheap forward-mode derivatives.

MeanFlow differentiates the whole network along a direction (v, 1, 0) for (z, t, r) once per
training step, with torch.func.jvp or with the fused pass of zoo.models.dual.  Every module here
is its torch.nn namesake (same arguments, same state_dict) whose `forward` takes a Tensor or a
`Dual`: given a Tensor it is the plain layer, given a Dual it also carries the tangent of the
Dual's rows (zoo.models.dual), so a model's forward is written once for both.

Three layer types need more than PyTorch's own forward-AD rules:

* Group norm.  PyTorch's rule for `native_group_norm` is a chain of ~40 small kernels per call
  (a large share of a U-Net's JVP time).  `GroupNorm` keeps the native kernels for the primal and
  the backward pass and computes the tangent in closed form: two per-group reductions and two
  fused multiply-adds.
* Layer norm (DiT) has the same problem and the same cure: `LayerNorm`.
* Attention.  The fused SDPA kernels (flash, memory-efficient, CPU flash) have no forward-AD
  rule at all, so plain models must fall back to math attention.  `attention` runs the primal
  through `F.scaled_dot_product_attention` and computes the tangent from an explicit formula.

These are `torch.autograd.Function`s with `forward`/`setup_context` (required by torch.func),
`backward` and `jvp`; their tangent formulas live in zoo.models.tangents.  The tangents are
themselves differentiable (the JVP's ops are recorded by autograd when grad mode is on), so a
loss may use the primal output of a JVP ("primal reuse") and even back-propagate through the
tangent and get exact gradients.  A caller that detaches the tangent anyway (every MeanFlow JVP
mode) wraps the JVP in `detached_tangents()`: the tangents are then computed without recording,
which brings a grad-recording JVP step's peak memory down to about a flow-matching step's
(EXPERIMENT_LOG.md, "What-if: a JVP-friendly convolution").

While torch.compile traces them, the layers run the native operations instead (it cannot trace
a Function with a custom jvp; a compiled step takes no torch.func.jvp).
"""

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from zoo.models import group_norm_tangent_kernel, tangents
from zoo.models.dual import Dual, Value, primal, tangent

__all__ = [
    "GELU",
    "Attention",
    "Conv2d",
    "Dropout",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "SiLU",
    "attention",
    "detached_tangents",
    "norm_input",
]

# A context variable, not a module global: per thread (and task), so a JVP in one thread does not
# change how another thread's layers record their tangents.
_tangents_detached: ContextVar[bool] = ContextVar("zoo_tangents_detached", default=False)


@contextmanager
def detached_tangents() -> Iterator[None]:
    """Within this block the layers' JVP tangents are computed without autograd recording.

    For callers that detach the tangent (it then needs no graph); back-propagating through a
    tangent computed here would miss these layers' contributions, so only use it where the
    tangent is detached.
    """
    token = _tangents_detached.set(True)
    try:
        yield
    finally:
        _tangents_detached.reset(token)


def _tangent_grad_mode():
    """no_grad inside detached_tangents(), else the caller's grad mode."""
    return torch.no_grad() if _tangents_detached.get() else nullcontext()


# ----------------------------------------------------------------------------- group norm


def _differentiable_statistics(x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """The saved mean and rstd = (var + eps)^-1/2 over x's last dim, with autograd gradients.

    The norms' saved statistics are non-differentiable outputs, so a tangent built from them
    would have wrong gradients.  Values stay bit-identical (a - a.detach() == 0); gradients are
    those of mean(x) and of rstd through d rstd = -rstd^3 / 2 * d var, with var written as
    E[x^2] - mean^2: its value may cancel badly but is never used, and its gradient
    2 (x - mean) / n is exact.  (torch.var_mean is 10-25x slower than these two reductions
    on CPU.)
    """
    m = x.mean(-1, keepdim=True)
    var = torch.linalg.vecdot(x, x).unsqueeze(-1) / x.shape[-1] - m * m
    return mean + (m - m.detach()), rstd - 0.5 * rstd**3 * (var - var.detach())


class _GroupNormFunction(torch.autograd.Function):
    """y = (x - mean_g) * rstd_g * weight_c + bias_c, statistics per (sample, group).

    Tangent: zoo.models.tangents.group_norm_tangent, from the saved statistics.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float):
        n, c = x.shape[:2]
        return torch.native_group_norm(
            x.contiguous(), weight, bias, n, c, math.prod(x.shape[2:]), num_groups, eps
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, num_groups, _eps = inputs
        _, mean, rstd = output
        ctx.num_groups = num_groups
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)

    @staticmethod
    @once_differentiable  # double backward would be silently wrong: make it an error
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor | None, _grad_rstd: Tensor | None):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad_y.contiguous(),
            x.contiguous(),
            mean,
            rstd,
            weight,
            n,
            c,
            math.prod(x.shape[2:]),
            ctx.num_groups,
            list(ctx.needs_input_grad[:3]),
        )
        return grad_x, grad_w, grad_b, None, None

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dw: Tensor | None, db: Tensor | None, *_):
        x, weight, mean, rstd = ctx.saved_tensors
        n = x.shape[0]
        groups = ctx.num_groups
        # torch.func passes zeros for inputs without a tangent; torch.autograd.forward_ad
        # passes None.
        dx = torch.zeros_like(x) if dx is None else dx
        with _tangent_grad_mode():
            # Low-precision inputs: the closed form subtracts nearly equal terms; do it in fp32.
            work = torch.promote_types(x.dtype, torch.float32)
            mean = mean.reshape(n, groups, 1).to(work)
            rstd = rstd.reshape(n, groups, 1).to(work)
            if torch.is_grad_enabled():
                # Inside torch.func.jvp `x.requires_grad` reads False even when an outer autograd
                # level tracks x, so grad mode is the only usable signal.
                mean, rstd = _differentiable_statistics(x.reshape(n, groups, -1).to(work), mean, rstd)
            dy = tangents.group_norm_tangent(
                x.to(work), dx.to(work), weight.to(work), mean, rstd, groups, dw, db
            )
        return dy.to(x.dtype), None, None


def norm_input(x: Tensor) -> Tensor:
    """What group and layer norm compute on: x, with fp16/bf16 upcast to fp32 under autocast.

    CUDA autocast runs F.group_norm and F.layer_norm in fp32 (and leaves fp64 alone); the native
    kernels called here are on no autocast list, so that policy is applied by hand (on every
    device: accurate statistics of low-precision activations, and the closed-form tangents want
    fp32).  A Dual's tangent reads its rows from this same copy: no second cast."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


def _normalize_rows(norm: "GroupNorm | LayerNorm", x: Dual) -> Dual:
    """A norm of a Dual: the primal through the norm's kernels, the rows' tangent in closed form
    from the statistics that normalisation saved."""
    # The fp32 copy the norm computes on under autocast: its rows are views, not casts.
    x_in = norm_input(x.primal)
    out, mean, rstd = norm.normalize(x_in)
    if x.tangent is None:
        return Dual(out, None, x.meta)
    meta = x.meta
    with meta.island():
        rows = meta.at(x_in)
        dx = x.tangent.to(rows.dtype)
        return Dual(out, norm.row_tangent(rows, dx, meta.at(mean), meta.at(rstd), meta.kernels), meta)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (always affine, same `weight`/`bias` state_dict keys) with a fast exact JVP."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)

    def forward(self, x: Value) -> Value:
        if isinstance(x, Dual):
            return _normalize_rows(self, x)
        return self.normalize(x)[0]

    def normalize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(output, mean, rstd), the statistics (N, G) without gradient."""
        x = norm_input(x)
        if torch.compiler.is_compiling():
            # Traced by torch.compile, which cannot trace a Function with a custom jvp: the native
            # op, whose backward autograd knows (a compiled step takes no torch.func.jvp).
            n, c = x.shape[:2]
            return torch.native_group_norm(
                x, self.weight, self.bias, n, c, math.prod(x.shape[2:]), self.num_groups, self.eps
            )
        return _GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)

    def row_tangent(self, x: Tensor, dx: Tensor, mean: Tensor, rstd: Tensor, kernels: str) -> Tensor:
        """The tangent at a Dual's rows x along dx, from their statistics (k, G); kernels="triton":
        zoo's Triton kernels where they apply."""
        if kernels == "triton" and group_norm_tangent_kernel.applies(x):
            return group_norm_tangent_kernel.group_norm_tangent(
                x, dx, self.weight, mean, rstd, self.num_groups
            )
        n, groups = x.shape[0], self.num_groups
        weight = self.weight.to(x.dtype)
        return tangents.group_norm_tangent(
            x, dx, weight, mean.reshape(n, groups, 1), rstd.reshape(n, groups, 1), groups
        )


# ----------------------------------------------------------------------------- layer norm


class _LayerNormFunction(torch.autograd.Function):
    """Layer norm over the last dimension; tangent: zoo.models.tangents.layer_norm_tangent."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        return torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)

    @staticmethod
    @once_differentiable  # double backward would be silently wrong: make it an error
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor | None, _grad_rstd: Tensor | None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, x.shape[-1:], mean, rstd, weight, bias, list(ctx.needs_input_grad[:3])
        )
        return grad_x, grad_w, grad_b, None

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dw: Tensor | None, db: Tensor | None, _):
        x, weight, mean, rstd = ctx.saved_tensors
        dx = torch.zeros_like(x) if dx is None else dx  # None under torch.autograd.forward_ad
        with _tangent_grad_mode():
            work = torch.promote_types(x.dtype, torch.float32)
            xw = x.to(work)
            mean, rstd = mean.to(work), rstd.to(work)
            if torch.is_grad_enabled():
                mean, rstd = _differentiable_statistics(xw, mean, rstd)
            weight = None if weight is None else weight.to(work)
            dy = tangents.layer_norm_tangent(xw, dx.to(work), weight, mean, rstd, dw, db)
        return dy.to(x.dtype), None, None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension (same state_dict) with a fast exact JVP."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Value) -> Value:
        if isinstance(x, Dual):
            return _normalize_rows(self, x)
        return self.normalize(x)[0]

    def normalize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(output, mean, rstd), the statistics (..., 1) without gradient."""
        x = norm_input(x)
        if torch.compiler.is_compiling():
            return torch.native_layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)  # see GroupNorm
        return _LayerNormFunction.apply(x, self.weight, self.bias, self.eps)

    def row_tangent(self, x: Tensor, dx: Tensor, mean: Tensor, rstd: Tensor, kernels: str) -> Tensor:
        """The tangent at a Dual's rows x along dx, from their statistics (k, ..., 1); one
        implementation whatever `kernels` says (a choice for group norm)."""
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return tangents.layer_norm_tangent(x, dx, weight, mean, rstd)


# ----------------------------------------------------------------------------- convolution


class _Conv2dFunction(torch.autograd.Function):
    """conv2d whose tangent is conv(dx, W) alone.

    PyTorch's forward-AD rule for convolution also computes conv(x, dW) + db, and under
    torch.func.jvp — which closes over the parameters — it materialises dW and db as zeros: a
    third full convolution per layer that multiplies by zero, a large share of the paper U-Net's
    JVP time (EXPERIMENT_LOG.md, "Conv2d with a JVP that skips the zero weight tangent").  zoo's
    JVPs are along (z, t, r) only, so the parameters' tangents are always zero and are ignored
    here; do not use this layer for a JVP with respect to the weights.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            [weight.shape[0]] if ctx.has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]],
        )
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, dx: Tensor, dw, db, *_) -> Tensor:
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        with _tangent_grad_mode():
            return F.conv2d(dx, weight.to(dx.dtype), None, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) with a JVP that skips the zero weight tangent."""

    def forward(self, x: Value) -> Value:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("zoo.models.layers.Conv2d supports numeric zero padding only")
        if isinstance(x, Dual):
            # d conv(x) = conv(dx): the bias has no tangent.
            return x.affine(
                self.forward,
                lambda dx: F.conv2d(
                    dx, self.weight.to(dx.dtype), None, self.stride, self.padding, self.dilation, self.groups
                ),
            )
        weight, bias = self.weight, self.bias
        if torch.compiler.is_compiling():
            # See GroupNorm.
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
            # Autocast's cast (which leaves fp64 alone), done before the Function rather than
            # inside it: the Function then saves the low-precision input and weight its
            # convolution used (half the memory of fp32 copies, and no second cast in backward),
            # and the casts' own backward hands fp32 gradients to fp32 tensors, as autocast does
            # for nn.Conv2d.
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return _Conv2dFunction.apply(
                    x, weight, bias, self.stride, self.padding, self.dilation, self.groups
                )
        return _Conv2dFunction.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Linear(nn.Linear):
    """nn.Linear (same state_dict) that also takes a Dual: d(W x + b) = W dx."""

    def forward(self, x: Value) -> Value:
        if isinstance(x, Dual):
            return x.affine(super().forward, lambda dx: F.linear(dx, self.weight.to(dx.dtype)))
        return super().forward(x)


# ----------------------------------------------------------------------------- element-wise


class SiLU(nn.SiLU):
    """nn.SiLU that also takes a Dual."""

    def forward(self, x: Value) -> Value:
        if isinstance(x, Dual):
            return x.elementwise(F.silu, tangents.silu_tangent)
        return super().forward(x)


class GELU(nn.GELU):
    """nn.GELU (exact or tanh-approximated) that also takes a Dual."""

    def forward(self, x: Value) -> Value:
        if isinstance(x, Dual):
            return x.elementwise(
                super().forward, functools.partial(tangents.gelu_tangent, approximate=self.approximate)
            )
        return super().forward(x)


class Dropout(nn.Dropout):
    """nn.Dropout that also takes a Dual: the rows' tangent gets the primal's mask and scale."""

    def forward(self, x: Value) -> Value:
        if not isinstance(x, Dual):
            return super().forward(x)
        if not self.training or self.p == 0.0:
            return x
        out, keep = torch.native_dropout(x.primal, self.p, True)
        if x.tangent is None:
            return Dual(out, None, x.meta)
        with x.meta.island():
            return Dual(out, tangents.dropout_tangent(x.tangent, keep[x.meta.rows], self.p), x.meta)


# ----------------------------------------------------------------------------- attention


class _AttentionFunction(torch.autograd.Function):
    """O = softmax(Q K^T / sqrt(d)) V over (batch, heads, tokens, head_dim) tensors.

    Primal: F.scaled_dot_product_attention (flash / memory-efficient kernels where available).
    Tangent: zoo.models.tangents.attention_tangent, from the saved output.
    Backward: the fused kernel's own backward, on a recomputed primal (keeps the O(N) memory of
    flash attention instead of storing P).
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    @once_differentiable  # double backward would be silently wrong: make it an error
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves)
            return torch.autograd.grad(out, leaves, grad_out)

    @staticmethod
    def jvp(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None) -> Tensor:
        q, k, v, out = ctx.saved_tensors
        # torch.func passes zeros for inputs without a tangent; forward_ad passes None.
        dq, dk, dv = (torch.zeros_like(p) if t is None else t for p, t in ((q, dq), (k, dk), (v, dv)))
        with _tangent_grad_mode():
            return tangents.attention_tangent(q, k, v, out, dq, dk, dv)


def attention(q: Value, k: Value, v: Value) -> Value:
    """softmax(q k^T / sqrt(d)) v for (batch, heads, tokens, head_dim) tensors or Duals, JVP-capable.

    While compiling: the native op.  Its backward follows autocast, where the eager Function's
    recomputes outside it; the two differ only for fp32 q/k/v under autocast, which zoo's models
    never produce (their q/k/v come out of an autocast Linear)."""
    if isinstance(q, Dual) or isinstance(k, Dual) or isinstance(v, Dual):
        return _attention_rows(q, k, v)
    if torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v)  # see GroupNorm.normalize
    return _AttentionFunction.apply(q, k, v)


def _attention_rows(q: Value, k: Value, v: Value) -> Dual:
    """attention of Duals: the primal through `attention`, the rows' tangent in closed form."""
    meta = next(a.meta for a in (q, k, v) if isinstance(a, Dual))
    out = attention(primal(q), primal(k), primal(v))
    if all(tangent(a) is None for a in (q, k, v)):
        return Dual(out, None, meta)
    with meta.island():
        qr, kr, vr, outr = (meta.at(primal(a)) for a in (q, k, v, out))
        dq, dk, dv = (
            torch.zeros_like(r) if tangent(a) is None else tangent(a).to(r.dtype)
            for a, r in ((q, qr), (k, kr), (v, vr))
        )
        return Dual(out, tangents.attention_tangent(qr, kr, vr, outr, dq, dk, dv), meta)


class Attention(nn.Module):
    """Multi-head self-attention over tokens: (B, N, dim) -> (B, N, dim).

    A U-Net applies it to (B, H*W, C) views of a feature map (a Linear on channels is a 1x1
    convolution).
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: Value) -> Value:
        b, n, dim = x.shape
        # (B, N, 3 * dim) -> q, k, v of (B, heads, N, head_dim), split batch-first (as a Dual's
        # methods require).
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.unbind(1)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, dim))
