"""Checks of zoo.models.group_norm_tangent_kernel, run by tests/test_group_norm_tangent_kernel.py: on a
CPU in a subprocess started with TRITON_INTERPRET=1 (Triton's interpreter must be on before Triton
is first imported, which a pytest process may already have done: torch.compile tests); on CUDA
in the test process, compiled."""

import torch
import torch.nn.functional as F

from model_helpers import perturb
from zoo.config.schema import LossConfig, UNetConfig
from zoo.losses import build_loss
from zoo.losses.jvp import cuda_fp32_precision
from zoo.models import build_model, group_norm_tangent_kernel

CASES = [
    ((3, 16, 5, 7), 4, 0.0),  # a group's elements not a multiple of the block
    ((2, 8, 40, 40), 8, 0.0),  # one channel per group, groups longer than one block
    ((2, 12, 4, 4), 3, 50.0),  # group means far from zero: E[x dx] - mu E[dx] would cancel
    ((2, 6), 2, 0.0),  # no spatial dimensions
    ((2, 8, 24, 24), 2, 0.0),  # several channels per group and several blocks per group: channel index
]
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: the output's own rounding


def reference_tangent(x, dx, weight, groups):
    """d/ds F.group_norm(x + s dx) at s = 0 in float64 (the bias has no tangent)."""
    _, tangent = torch.func.jvp(lambda a: F.group_norm(a, groups, weight, None, eps=1e-5), (x,), (dx,))
    return tangent


def tangent_errors(device: str = "cpu") -> list[str]:
    """Relative errors of the kernel's tangent against forward-mode AD, and whether each passes."""
    lines = []
    for dtype, tolerance in TOLERANCES.items():
        for shape, groups, offset in CASES:
            generator = torch.Generator().manual_seed(0)
            # The values the kernel sees (rounded to dtype) are the ones the reference differentiates at.
            x = (2 * torch.randn(shape, generator=generator, dtype=torch.float64) + offset).to(dtype).double()
            dx = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).double()
            weight = torch.randn(shape[1], generator=generator, dtype=torch.float64)
            grouped = x.reshape(shape[0], groups, -1)
            mean, rstd = grouped.mean(-1), (grouped.var(-1, unbiased=False) + 1e-5).rsqrt()
            got = group_norm_tangent_kernel.group_norm_tangent(
                x.to(device, dtype), dx.to(device, dtype), weight.float().to(device), mean.to(device), rstd.to(device), groups
            ).cpu()
            want = reference_tangent(x, dx, weight, groups)
            error = ((got.double() - want).norm() / want.norm()).item()
            ok = got.dtype == dtype and got.shape == x.shape and error < tolerance
            lines.append(f"{'ok' if ok else 'FAIL'} {dtype} {shape} groups {groups} offset {offset}: {error:.2e}")
    return lines


def fused_step_difference(device: str = "cpu") -> dict[str, float]:
    """A fused MeanFlow step on a U-Net with the kernels vs the PyTorch operations."""
    cfg = UNetConfig(channels=16, channel_mults=[1, 2], blocks_per_res=1, attention_res=[4], dropout=0.0, num_groups=8)
    torch.manual_seed(0)
    model = perturb(build_model(cfg, (3, 8, 8), 3).train()).to(device)
    x, y = torch.randn(6, 3, 8, 8).to(device), torch.randint(0, 3, (6,)).to(device)
    calls = []
    kernel_tangent = group_norm_tangent_kernel.group_norm_tangent
    group_norm_tangent_kernel.group_norm_tangent = lambda *a: calls.append(1) or kernel_tangent(*a)
    results = {}
    try:
        for kernels in ("torch", "triton"):
            loss_fn = build_loss(LossConfig(kind="meanflow", jvp="fused", ratio=0.5, jvp_kernels=kernels, weight_p=0.0))
            draws = loss_fn.draw(model, x, y, torch.Generator(device=device).manual_seed(1))
            model.zero_grad(set_to_none=True)
            # IEEE fp32 on CUDA: TF32 convolutions would differ between the runs by more than the kernels do.
            with cuda_fp32_precision("ieee"):
                loss, _ = loss_fn.evaluate(model, x, draws)
                loss.backward()
            results[kernels] = loss.detach(), [p.grad.clone() for p in model.parameters()]
    finally:  # the CUDA test runs in the pytest process
        group_norm_tangent_kernel.group_norm_tangent = kernel_tangent
    (loss_torch, grads_torch), (loss_triton, grads_triton) = results["torch"], results["triton"]
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads_triton, grads_torch, strict=True))
    return {
        "kernel_calls": len(calls),
        "group_norms": sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()),
        "loss_relative_difference": abs((loss_triton - loss_torch) / loss_torch).item(),
        "worst_grad_difference": worst,  # per tensor, relative to its largest entry
        "grad_norm": sum(g.norm() ** 2 for g in grads_torch).sqrt().item(),
    }
