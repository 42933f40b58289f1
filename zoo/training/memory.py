"""No silent out-of-memory: before training, a probe step checks that the configured batch fits.

If it does not, the batch is split into micro-batches with gradient accumulation (same
effective batch, so the same optimisation), or — with `train.auto_microbatch = false` — the run
fails at once naming the largest batch that fits.  The predecessor's MeanFlow runs at ratio 0.75
ran out of memory silently and "appeared running" for an hour (defect 12).

Measuring peak memory:
- CUDA: the allocator's real peak (`max_memory_allocated`), and a real OOM counts as "does not fit".
- CPU / MPS: PyTorch keeps no peak statistic, so the meter adds up what a training step holds at
  its peak: every tensor autograd saves for the backward pass (counted once per storage through
  saved-tensor hooks), plus parameters, gradients and Adam's two moments.  Activations saved for
  backward dominate a training step, so this is a close, slightly low estimate; with
  `train.memory_limit_gb` it makes the whole mechanism testable on a CPU.
"""

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class MemoryLimitError(RuntimeError):
    """The configured batch cannot be trained within the memory limit."""


@dataclass(frozen=True)
class Measurement:
    fits: bool
    peak_bytes: int


class MemoryMeter(ABC):
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes

    @abstractmethod
    def measure(self, step: Callable[[], None]) -> Measurement: ...


class CudaMeter(MemoryMeter):
    def __init__(self, device: torch.device, limit_bytes: int | None) -> None:
        total = torch.cuda.get_device_properties(device).total_memory
        super().__init__(min(limit_bytes, total) if limit_bytes else total)
        self.device = device

    def measure(self, step: Callable[[], None]) -> Measurement:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            step()
            torch.cuda.synchronize(self.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return Measurement(False, self.limit_bytes + 1)
        peak = torch.cuda.max_memory_allocated(self.device)
        return Measurement(peak <= self.limit_bytes, peak)


class SavedTensorMeter(MemoryMeter):
    """Estimated peak of a training step: saved activations + parameters, gradients, Adam state."""

    def __init__(self, model: nn.Module, limit_bytes: int | None) -> None:
        super().__init__(limit_bytes or physical_memory_bytes())
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.static_bytes = 4 * param_bytes  # weights, gradients, Adam's exp_avg and exp_avg_sq

    def measure(self, step: Callable[[], None]) -> Measurement:
        seen: set[tuple[int, ...]] = set()
        saved = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if not isinstance(tensor, nn.Parameter):
                key, nbytes = storage_key(tensor)
                if key not in seen:
                    seen.add(key)
                    saved += nbytes
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()
        peak = saved + self.static_bytes
        return Measurement(peak <= self.limit_bytes, peak)


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The real tensor under torch.func's wrappers (inside a JVP, saved tensors are wrapped and
    their own storage cannot be read)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def storage_key(tensor: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """An identity for the memory behind a saved tensor, and its size in bytes.

    Views share a storage and are counted once.  Some tensors saved inside torch.func.jvp have
    a storage Python cannot read (it raises); those are counted at their own size, by identity.
    """
    tensor = plain_tensor(tensor)
    try:
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), storage.nbytes()), storage.nbytes()
    except RuntimeError:
        return (id(tensor),), tensor.numel() * tensor.element_size()


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_meter(model: nn.Module, device: torch.device, limit_gb: float | None) -> MemoryMeter:
    limit = int(limit_gb * 2**30) if limit_gb else None
    if device.type == "cuda":
        return CudaMeter(device, limit)
    return SavedTensorMeter(model, limit)


@dataclass(frozen=True)
class MicroBatchPlan:
    micro_batches: int
    micro_batch_size: int
    peak_bytes: int

    def describe(self, batch_size: int) -> str:
        if self.micro_batches == 1:
            return f"batch {batch_size} fits (peak ≈ {self.peak_bytes / 2**30:.2f} GiB)"
        return (
            f"batch {batch_size} split into {self.micro_batches} micro-batches of {self.micro_batch_size} "
            f"with gradient accumulation (same effective batch; peak ≈ {self.peak_bytes / 2**30:.2f} GiB)"
        )


def divisors_from(batch_size: int, start: int) -> list[int]:
    """Micro-batch counts m >= start that split batch_size evenly, smallest first."""
    return [m for m in range(start, batch_size + 1) if batch_size % m == 0]


def plan_micro_batches(
    probe: Callable[[int], None],
    meter: MemoryMeter,
    batch_size: int,
    start_micro_batches: int,
    allow_split: bool,
) -> MicroBatchPlan:
    """Fewest micro-batches (>= start) whose size fits; `probe(size)` runs one forward+backward."""
    cache: dict[int, Measurement] = {}

    def measure(size: int) -> Measurement:
        if size not in cache:
            cache[size] = meter.measure(lambda: probe(size))
        return cache[size]

    counts = divisors_from(batch_size, start_micro_batches)
    first = batch_size // counts[0]
    if measure(first).fits:
        return MicroBatchPlan(counts[0], first, measure(first).peak_bytes)
    if not allow_split:
        largest = largest_fitting_size(measure, first)
        limit = meter.limit_bytes / 2**30
        hint = (
            f"the largest batch that fits is {largest}: set train.batch_size={largest}, or "
            "train.auto_microbatch=true to keep the batch and accumulate gradients"
            if largest
            else "not even a batch of 1 fits: use a smaller model or more memory"
        )
        raise MemoryLimitError(
            f"a training step on batch {first} needs ≈ {measure(first).peak_bytes / 2**30:.2f} GiB, "
            f"over the limit of {limit:.2f} GiB; {hint}"
        )
    for m in counts[1:]:
        if measure(batch_size // m).fits:
            return MicroBatchPlan(m, batch_size // m, measure(batch_size // m).peak_bytes)
    raise MemoryLimitError(
        f"not even a micro-batch of 1 fits in {meter.limit_bytes / 2**30:.2f} GiB "
        f"(needs ≈ {measure(1).peak_bytes / 2**30:.2f} GiB): use a smaller model or more memory"
    )


def largest_fitting_size(measure: Callable[[int], Measurement], too_big: int) -> int:
    """Binary search for the largest batch that fits below a size that does not (0 if none)."""
    low, high = 0, too_big  # low fits (0 trivially), high does not
    while high - low > 1:
        mid = (low + high) // 2
        if measure(mid).fits:
            low = mid
        else:
            high = mid
    return low
