"""Checks of zoo.models.group_norm_tangent_kernel, run by tests/test_group_norm_tangent_kernel.py: on a
CPU in a subprocess started with TRITON_INTERPRET=1 (Triton's interpreter must be on before Triton
is first imported, which a pytest process may already have done: torch.compile tests); on CUDA
in the test process, compiled."""

import torch
import torch.nn.functional as F
from model_helpers import perturb

from zoo.config.schema import LossConfig, UNetConfig
from zoo.devices import cuda_fp32_precision
from zoo.losses import build_loss
from zoo.losses.base import map_tensors
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
                x.to(device, dtype),
                dx.to(device, dtype),
                weight.float().to(device),
                mean.to(device),
                rstd.to(device),
                groups,
            ).cpu()
            want = reference_tangent(x, dx, weight, groups)
            error = ((got.double() - want).norm() / want.norm()).item()
            ok = got.dtype == dtype and got.shape == x.shape and error < tolerance
            lines.append(
                f"{'ok' if ok else 'FAIL'} {dtype} {shape} groups {groups} offset {offset}: {error:.2e}"
            )
    return lines


def fused_step_errors(device: str = "cpu") -> dict[str, float]:
    """A fused MeanFlow step on a U-Net in fp32, with the kernels and with the PyTorch operations,
    each against the same step in float64 (the PyTorch operations; the kernels leave fp64 alone).

    Against float64 rather than against each other: the two fp32 paths sum in different orders, so
    their difference measures rounding, amplified by whatever runs after the tangents; each path's
    distance from float64 is its accuracy.  jvp_precision="fp32": under the default "tf32" the
    tangent island's convolutions round their inputs to TF32, which turned the paths' ~1e-7
    differences into gradients 1.8e-4 apart on a GPU, whatever precision the caller set.
    """
    cfg = UNetConfig(
        channels=16, channel_mults=[1, 2], blocks_per_res=1, attention_res=[4], dropout=0.0, num_groups=8
    )
    torch.manual_seed(0)
    model = perturb(build_model(cfg, (3, 8, 8), 3).train()).to(device)
    x, y = torch.randn(6, 3, 8, 8).to(device), torch.randint(0, 3, (6,)).to(device)
    calls = []
    kernel_tangent = group_norm_tangent_kernel.group_norm_tangent
    group_norm_tangent_kernel.group_norm_tangent = lambda *a: calls.append(1) or kernel_tangent(*a)
    steps = {}
    try:
        for name, kernels, dtype in (
            ("float64", "torch", torch.float64),
            ("torch", "torch", torch.float32),
            ("triton", "triton", torch.float32),
        ):
            loss_fn = build_loss(
                LossConfig(
                    kind="meanflow",
                    jvp="fused",
                    ratio=0.5,
                    jvp_kernels=kernels,
                    jvp_precision="fp32",
                    weight_p=0.0,
                )
            )
            draws = loss_fn.draw(model, x, y, torch.Generator(device=device).manual_seed(1))
            draws = map_tensors(draws, lambda t, dtype=dtype: t.to(dtype) if t.is_floating_point() else t)
            model.to(dtype).zero_grad(set_to_none=True)
            # IEEE fp32 on CUDA outside the tangent island too.
            with cuda_fp32_precision("ieee"):
                loss, _ = loss_fn.evaluate(model, x.to(dtype), draws)
                loss.backward()
            steps[name] = loss.detach().double(), [p.grad.double() for p in model.parameters()]
    finally:  # the CUDA test runs in the pytest process
        group_norm_tangent_kernel.group_norm_tangent = kernel_tangent
    loss_64, grads_64 = steps["float64"]

    assert all(g.abs().max() > 0 for g in grads_64), "a parameter without gradient: no relative error to take"

    def worst_grad_error(grads):  # per tensor, relative to the float64 tensor's largest entry
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, grads_64, strict=True))

    result = {
        "kernel_calls": len(calls),
        "group_norms": sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()),
        "grad_norm": sum(g.norm() ** 2 for g in grads_64).sqrt().item(),
    }
    for name in ("torch", "triton"):
        loss, grads = steps[name]
        result[f"{name}_loss_error"] = abs((loss - loss_64) / loss_64).item()
        result[f"{name}_grad_error"] = worst_grad_error(grads)
    return result


def first_launch_failure() -> str | None:
    """zoo's first-launch check of the kernels, on the CPU (run with the interpreter on)."""
    return group_norm_tangent_kernel.first_launch_failure(torch.device("cpu"))
