"""The group-norm tangent of MeanFlow's fused JVP in two Triton kernels (loss.jvp_kernels: "auto",
the default, uses them on CUDA; "triton" forces them).

With xhat = (x - mu) rstd per (sample, group) of M elements, the tangent along dx is
    dy = w_c rstd (dx - S1/M - (x - mu) rstd^2 S2/M),   S1 = sum(dx),  S2 = sum((x - mu) dx).
Kernel 1 reduces S1 and S2 per (sample, group), reading x and dx once; kernel 2 writes dy,
reading them once more: 2 launches and 5 passes over the activation, against ~13 launches (most
of them tiny per-group ones) and ~10 passes of zoo.models.tangents.group_norm_tangent.  On a GPU
the fused step's extra time is kernels and memory traffic rather than arithmetic
(EXPERIMENT_LOG.md), and this tangent is the largest share of that traffic.  S2 is summed about
the primal's mean mu, known beforehand, so it has none of E[x dx] - mu E[dx]'s cancellation.

Tested on a CPU through Triton's interpreter (TRITON_INTERPRET=1, tests/test_group_norm_tangent_kernel.py)
and compiled on CUDA (EXPERIMENT_LOG.md).
"""

import contextlib
import functools
import importlib.util
import os
import warnings
from types import SimpleNamespace

import torch
from torch import Tensor

from zoo.models import tangents

# Bound by kernels() on first use.  Module globals, not locals of kernels(): Triton's compiler and
# its interpreter both resolve a kernel's names through the function's globals.
triton = tl = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp64 stays on the torch path
BLOCK = 1024


@functools.cache
def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Triton runs kernels on CPU tensors through its interpreter (read when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unusable_reason(device: torch.device) -> str | None:
    """Why loss.jvp_kernels="triton" cannot run on `device`, or None."""
    if not installed():
        return "Triton is not installed"
    if device.type == "cuda" and interpreted():
        return (
            "TRITON_INTERPRET=1 runs Triton kernels on the CPU (slowly, and not inside CUDA graphs): unset it"
        )
    if device.type != "cuda" and not interpreted():
        return f"the Triton kernels run on CUDA, and this run uses {device}"
    return None


def refusal(device: torch.device) -> str | None:
    """loss.jvp_kernels="triton" on `device`: why it cannot run and the fix, or None."""
    if reason := unusable_reason(device):
        return f"loss.jvp_kernels=triton cannot run: {reason}; use loss.jvp_kernels=torch"
    return None


# Per CUDA device ("cuda:0"): why the kernels failed their first launch there, or None.
first_launches: dict[str, str | None] = {}


def resolve(kernels: str, device: torch.device) -> str:
    """loss.jvp_kernels as a run on `device` uses it: "auto" is "triton" on a CUDA device where the
    kernels can run, "torch" anywhere else (never the interpreter: it is for tests, and slow).

    Why "auto" prefers the kernels on CUDA: on a GPU (bf16, batch 128, paper U-Net, captured
    steps) they brought the MeanFlow step closer to a flow-matching step at every ratio measured
    (EXPERIMENT_LOG.md, "H200: the Triton group-norm tangents").  Because "auto" is the default, it
    must not turn a machine where Triton is installed but cannot build or launch kernels into a
    failed run: the first use on each device launches them once on a tiny tensor and falls back
    to the PyTorch operations, with a warning, if that fails (first_launch_failure).
    """
    if kernels != "auto":
        return kernels
    if device.type != "cuda" or unusable_reason(device) is not None:
        return "torch"
    key = cuda_key(device)
    if key not in first_launches:
        if torch.cuda.is_current_stream_capturing():
            # Never launch (or synchronise) inside a graph capture.  Not reached by zoo's own runs:
            # the trainer and the bench resolve before any capture, to name the choice.
            return "torch"
        first_launches[key] = failure = first_launch_failure(torch.device(key))
        if failure:
            warnings.warn(
                f"loss.jvp_kernels=auto: the Triton group-norm tangent kernels failed on {key} ({failure}); "
                "the fused JVP uses the PyTorch operations instead "
                "(set loss.jvp_kernels=torch to skip the attempt)",
                stacklevel=2,
            )
    return "torch" if first_launches[key] else "triton"


def has_group_norms(model: torch.nn.Module) -> bool:
    """Whether a fused step of `model` has group-norm tangents for loss.jvp_kernels to choose."""
    return any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def cuda_key(device: torch.device) -> str:
    """A CUDA device as first_launches keys it: "cuda" is the current device's index."""
    return str(torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index))


def failed_first_launch(device: torch.device) -> str | None:
    """Why "auto" fell back to the PyTorch operations on `device` after trying the kernels, or None."""
    return first_launches.get(cuda_key(device)) if device.type == "cuda" else None


def first_launch_failure(device: torch.device) -> str | None:
    """Why the kernels cannot serve on `device` (building or launching them raised, or their result
    is off the PyTorch operations'), or None.  One tiny launch: a few ms once the kernels are built."""
    generator = torch.Generator().manual_seed(0)
    x, dx, weight = (
        torch.randn(shape, generator=generator).to(device) for shape in ((2, 4, 3, 5), (2, 4, 3, 5), (4,))
    )
    if device.type == "cuda":
        # Outside the try: an error pending from earlier GPU work is not the kernels' and must not
        # be taken for theirs (a broken CUDA context would fail the run anyway, fallback or not).
        torch.cuda.synchronize(device)
    try:
        grouped = x.reshape(2, 2, -1)
        mean, rstd = (
            grouped.mean(-1, keepdim=True),
            (grouped.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt(),
        )
        got = group_norm_tangent(x, dx, weight, mean, rstd, 2)
        error = ((got - tangents.group_norm_tangent(x, dx, weight, mean, rstd, 2)).norm() / got.norm()).item()
    except (
        Exception
    ) as failure:  # Triton's toolchain: no C compiler, an unsupported GPU, an unwritable cache...
        lines = str(failure).strip().splitlines()
        return f"{type(failure).__name__}: {lines[0][:200]}" if lines else type(failure).__name__
    if not error < 1e-4:  # also catches NaN
        return f"their result differed from the PyTorch operations' by {error:.1e} (relative)"
    return None


def applies(x: Tensor) -> bool:
    """Whether the kernels take this tangent: a kernel dtype, on their device, not under torch.compile
    (inductor fuses the torch version's operations itself)."""
    return (
        x.dtype in KERNEL_DTYPES
        and x.device.type in ("cuda", "cpu")  # the CPU through the interpreter only (unusable_reason)
        and not torch.compiler.is_compiling()
        and unusable_reason(x.device) is None
    )


@functools.cache
def kernels() -> SimpleNamespace:
    """The two kernels, defined on first use: importing Triton costs every CLI start-up otherwise."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    # M, the elements per group, is a compile-time constant: one compilation per group size (a
    # handful in a U-Net), and Triton 3.6's interpreter cannot loop to a runtime bound.
    def group_sums(x_ptr, dx_ptr, mean_ptr, s1_ptr, s2_ptr, M: tl.constexpr, BLOCK: tl.constexpr):
        group = tl.program_id(0)  # (sample, group); its M elements are contiguous
        base = group.to(tl.int64) * M
        mu = tl.load(mean_ptr + group).to(tl.float32)
        sum_dx = tl.zeros([BLOCK], dtype=tl.float32)
        sum_xc_dx = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < M
            x = tl.load(x_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
            dx = tl.load(dx_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
            sum_dx += dx
            sum_xc_dx += (x - mu) * dx  # dx is 0 outside: nothing added there
        tl.store(s1_ptr + group, tl.sum(sum_dx, axis=0))
        tl.store(s2_ptr + group, tl.sum(sum_xc_dx, axis=0))

    @triton.jit
    def tangent(
        x_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, s1_ptr, s2_ptr, out_ptr, M, L, CPG, G, BLOCK: tl.constexpr
    ):
        group = tl.program_id(0)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < M
        base = group.to(tl.int64) * M
        mu = tl.load(mean_ptr + group).to(tl.float32)
        rstd = tl.load(rstd_ptr + group).to(tl.float32)
        mean_dx = tl.load(s1_ptr + group) / M
        coefficient = rstd * rstd * (tl.load(s2_ptr + group) / M)
        channel = (group % G) * CPG + offsets // L
        w = tl.load(w_ptr + channel, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
        dy = w * rstd * (dx - mean_dx - (x - mu) * coefficient)
        tl.store(out_ptr + base + offsets, dy.to(out_ptr.dtype.element_ty), mask=inside)

    return SimpleNamespace(group_sums=group_sums, tangent=tangent, cdiv=triton.cdiv)


def group_norm_tangent(
    x: Tensor, dx: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, groups: int
) -> Tensor:
    """The tangent of group norm at x along dx, in x's dtype (as zoo.models.tangents.group_norm_tangent
    without weight tangents).  x, dx: (N, C, ...); weight: (C,); mean, rstd: N * groups values."""
    n, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    k = kernels()
    x, dx = x.contiguous(), dx.to(x.dtype).contiguous()
    per_group = x.numel() // (n * groups)
    spatial = per_group * groups // c
    stats = (n * groups,)
    s1 = torch.empty(stats, dtype=torch.float32, device=x.device)
    s2 = torch.empty(stats, dtype=torch.float32, device=x.device)
    mean, rstd = mean.reshape(stats).float().contiguous(), rstd.reshape(stats).float().contiguous()
    out = torch.empty_like(x)
    # Triton launches on the current CUDA device: make it x's (a run on cuda:1 without set_device).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        k.group_sums[(n * groups,)](x, dx, mean, s1, s2, per_group, BLOCK=BLOCK)
        k.tangent[(n * groups, k.cdiv(per_group, BLOCK))](
            x,
            dx,
            weight.contiguous(),
            mean,
            rstd,
            s1,
            s2,
            out,
            per_group,
            spatial,
            c // groups,
            groups,
            BLOCK=BLOCK,
        )
    return out
