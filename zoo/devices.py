"""Choosing the device: `auto` prefers CUDA, then Apple MPS, then the CPU; nothing else assumes one."""

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from zoo.config.schema import DEVICE_CHOICES, DEVICE_PATTERN
from zoo.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise DeviceError(f"device {name!r} is not one zoo can use; choose one of {DEVICE_CHOICES}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            f"device {name!r} was asked for but MPS is not available here; use --device cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(
            f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
        )
    if device.type == "cuda" and device.index is None:
        # Indexed, so that generators, tensors and comparisons all say "cuda:N": a generator
        # made on a bare "cuda" device reports "cuda" and then compares unequal to "cuda:0".
        return torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, treating a missing index as the current one ("cuda" is "cuda:0")."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None = plain fp32)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def enable_cuda_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA, and cuDNN's autotuner: what zoo trains
    (and benchmarks) with on a GPU.

    Matmuls through set_float32_matmul_precision("high"), which also sets the per-backend flag
    the JVP's fp32 island switches (cuda.matmul.fp32_precision = "tf32", zoo.losses.jvp): setting
    that flag alone leaves torch.get_float32_matmul_precision() raising ("mix of the legacy and
    new APIs"), and inductor's kernel tuning (train.compile_mode=max-autotune) calls it.
    That call also switches the CPU's oneDNN matmuls to TF32 (where the CPU has it): set back, as
    CPU work (evaluation of a copy on the CPU, the tests) keeps IEEE fp32.
    """
    torch.set_float32_matmul_precision("high")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cudnn.benchmark = True


@contextmanager
def cuda_fp32_precision(mode: str) -> Iterator[None]:
    """Set cuBLAS / cuDNN fp32 precision ("ieee" or "tf32") and restore the caller's values.

    Uses the new fp32_precision API and restores the exact previous value: mixing it with the
    legacy allow_tf32 flags otherwise makes later legacy reads raise.
    """
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    if matmul == mode and conv == mode:
        # Nothing to change (the usual case inside training, which sets TF32 globally): the fused
        # mode enters this once per layer, so skip the four setter calls.
        yield
        return
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
