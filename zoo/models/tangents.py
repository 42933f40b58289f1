"""Closed-form tangents (forward-mode derivatives) of zoo's layers, as plain tensor functions.

Each returns the layer's output tangent at the input x along the input tangent dx.  They serve
three callers: the layers' autograd Functions under torch.func.jvp (zoo.models.layers), the
fused pass that carries the tangents of a few batch rows (zoo.models.dual, through the layers),
and the check of the Triton group-norm kernel (zoo.models.group_norm_tangent_kernel).  This
module imports nothing from zoo, so all of them can import it.
"""

import torch
from torch import Tensor


def group_norm_tangent(
    x: Tensor,
    dx: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    groups: int,
    dw: Tensor | None = None,
    db: Tensor | None = None,
) -> Tensor:
    """The tangent of group norm y = (x - mean) rstd w + b at x along dx (and dw, db).

    x, dx: (N, C, ...); weight: (C,); mean, rstd: (N, G, 1) — all in the working dtype.
    With m = mean((x - mean) dx) per group and xhat = (x - mean) rstd,
        dy = w (rstd dx - rstd^3 m (x - mean) - rstd mean(dx)) + dw xhat + db
           = A dx + B x + O,
    whose factors A, B, O are small (N, G, C/G, 1) tensors formed by broadcasting per-group
    statistics against per-channel parameters: two reductions and two fused multiply-adds over
    the activation, where PyTorch's forward-AD rule for native_group_norm is a chain of ~40
    small kernels.
    """
    n, c = x.shape[:2]
    grouped = (n, groups, c // groups, -1)
    x4, dx4 = x.reshape(grouped), dx.reshape(grouped)
    per_channel = (1, groups, c // groups, 1)
    w = weight.reshape(per_channel)
    mean, rstd = mean.reshape(n, groups, 1, 1), rstd.reshape(n, groups, 1, 1)
    mean_dx = dx4.mean((2, 3), keepdim=True)
    # mean((x - mean) * dx), without materialising x - mean
    xdx = torch.linalg.vecdot(x4.flatten(2), dx4.flatten(2)).reshape(n, groups, 1, 1) / (
        x4.shape[2] * x4.shape[3]
    )
    m = torch.addcmul(xdx, mean, mean_dx, value=-1)
    cubed_m = rstd**3 * m
    a = w * rstd
    minus_b = w * cubed_m
    o = w * torch.addcmul(cubed_m * mean, rstd, mean_dx, value=-1)
    if dw is not None:
        dw_rstd = dw.to(x.dtype).reshape(per_channel) * rstd
        minus_b = minus_b - dw_rstd
        o = o - dw_rstd * mean
    if db is not None:
        o = o + db.to(x.dtype).reshape(per_channel)
    return torch.addcmul(o, a, dx4).addcmul_(minus_b, x4, value=-1).reshape(x.shape)


def layer_norm_tangent(
    x: Tensor,
    dx: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dw: Tensor | None = None,
    db: Tensor | None = None,
) -> Tensor:
    """The tangent of layer norm over the last dim; mean, rstd: (..., 1).  Group norm's closed
    form with the normalised rows as groups:
        dy = w rstd (dx - mean(dx) - xhat mean(xhat dx)) + dw xhat + db,
    evaluated as w (a dx + b x + c) with per-row a, b, c."""
    mean_dx = dx.mean(-1, keepdim=True)
    mean_xc_dx = torch.linalg.vecdot(x, dx).unsqueeze(-1) / x.shape[-1] - mean * mean_dx
    b = -(rstd**3) * mean_xc_dx
    dy = torch.addcmul(-rstd * mean_dx - b * mean, rstd, dx)
    dy = dy.addcmul_(b, x)
    if weight is not None:
        dy = dy * weight
    if dw is not None:
        dy = dy + (x - mean) * rstd * dw.to(x.dtype)
    if db is not None:
        dy = dy + db.to(x.dtype)
    return dy


def _as_batched_matrices(x: Tensor) -> Tensor:
    return x.reshape(-1, *x.shape[-2:])


def attention_tangent(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dq: Tensor, dk: Tensor, dv: Tensor
) -> Tensor:
    """dO of O = softmax(q k^T / sqrt(d)) v (= out) along (dq, dk, dv), over (batch, heads,
    tokens, head_dim) tensors.

    With P the attention probabilities and dS = (dQ K^T + Q dK^T) / sqrt(d):
        dO = P dV + (P * dS) V - rowsum(P * dS) * O
    (the softmax JVP dP = P * (dS - rowsum(P * dS)) with P V = O substituted).  P is recomputed
    once; the last term uses the output, which saves an N x N pass.
    """
    scale = q.shape[-1] ** -0.5
    # Fold the scale into the (small) query side rather than into the N x N scores.
    qs, dqs = _as_batched_matrices(q * scale), _as_batched_matrices(dq * scale)
    k3, dk3 = _as_batched_matrices(k), _as_batched_matrices(dk)
    v3, dv3 = _as_batched_matrices(v), _as_batched_matrices(dv)
    probs = torch.softmax(torch.bmm(qs, k3.mT), dim=-1)
    weighted = probs * torch.baddbmm(torch.bmm(dqs, k3.mT), qs, dk3.mT)  # P * dS
    tangent = torch.baddbmm(torch.bmm(probs, dv3), weighted, v3).reshape(out.shape)
    row_sums = weighted.sum(-1).reshape(*out.shape[:-1], 1)
    return torch.addcmul(tangent, row_sums, out, value=-1)


def silu_tangent(dx: Tensor, x: Tensor) -> Tensor:
    """silu'(x) dx.  silu_backward(g, x) = g silu'(x): one kernel."""
    return torch.ops.aten.silu_backward(dx, x)


def gelu_tangent(dx: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    """gelu'(x) dx (exact or tanh-approximated GELU), through gelu_backward: one kernel."""
    return torch.ops.aten.gelu_backward(dx, x, approximate=approximate)


def dropout_tangent(dx: Tensor, keep: Tensor, p: float) -> Tensor:
    """dx masked and scaled like the primal, with the primal's mask `keep`.

    dx * mask * scale in one kernel, rounded once: PyTorch's own forward-AD rule for dropout,
    bit for bit in every dtype (p = 1 keeps nothing: scale 0, as torch's)."""
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return torch.ops.aten.native_dropout_backward(dx, keep, scale)
