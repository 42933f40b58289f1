"""No silent out-of-memory: before training, a probe step checks that the configured batch fits.

If it does not, the batch is split into micro-batches with gradient accumulation (same
effective batch, so the same optimisation), or — with `train.auto_microbatch = false` — the run
fails at once naming the largest batch that fits.  Either way a batch that cannot fit is found
before the first step, not hours later by a process that dies without a word.

Measuring peak memory:
- CUDA: the allocator's real peak (`max_memory_allocated`), and a real OOM counts as "does not fit".
- CPU / MPS: PyTorch keeps no peak statistic, so `LiveTensorMeter` keeps one itself: a dispatch
  mode sees every tensor an operator creates during the step, adds its storage's size when it
  appears and subtracts it when the storage is freed (a finalizer on the storage object, which
  PyTorch keeps alive exactly as long as the memory), and records the maximum.  That is the
  exact peak of tensor memory — saved activations, the backward pass's gradient buffers and
  every temporary (the no-grad JVP's tangents) — plus what lives across steps: parameters and
  Adam's two moments (gradients are created inside the step and counted there).  Memory that
  kernels allocate outside tensors (oneDNN scratch space) is not seen.  With
  `train.memory_limit_gb` it makes the whole mechanism testable on a CPU.

  An earlier estimate summed the tensors autograd saves for backward.  It missed the backward
  pass's own buffers (an MLP step peaks at 3x its saved activations) and counted every
  nn.Linear weight again, since F.linear saves the view `weight.t()`, which is no Parameter.
"""

import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zoo.runs import MemoryLimitError
from zoo.units import format_bytes


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


class LiveTensors(TorchDispatchMode):
    """While active, the bytes of tensor storage created since entry that are still alive, and their peak.

    Outputs that share a storage with an input (views, in-place and out= operators) add nothing;
    zero tensors of forward-mode AD and meta tensors own no memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.sizes: dict[int, int] = {}  # data pointer -> bytes, for storages alive now
        self.finalizers: list[weakref.finalize] = []

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        # Storages still alive (gradients, outputs) outlive the meter: stop watching them.
        for finalizer in self.finalizers:
            finalizer.detach()

    def release(self, pointer: int, nbytes: int) -> None:
        self.live_bytes -= nbytes
        del self.sizes[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_pointer(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor) or not owns_memory(tensor):
                continue
            storage = plain_tensor(tensor).untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if pointer in inputs or pointer in self.sizes or nbytes == 0:
                continue
            self.sizes[pointer] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.finalizers.append(weakref.finalize(storage, self.release, pointer, nbytes))
        return out


def plain_tensor(tensor: Tensor) -> Tensor:
    """The real tensor under torch.func's wrappers (inside a JVP, saved tensors are wrapped and
    their own storage cannot be read)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def owns_memory(tensor: Tensor) -> bool:
    """False for tensors without readable storage: forward-AD zero tensors and meta tensors."""
    tensor = plain_tensor(tensor)
    return not (tensor.is_meta or tensor._is_zerotensor())


def storage_pointer(tensor: Tensor) -> int:
    return plain_tensor(tensor).untyped_storage().data_ptr() if owns_memory(tensor) else 0


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class LiveTensorMeter(MemoryMeter):
    """Exact peak of tensor memory in a training step, plus parameters and Adam's moments."""

    def __init__(self, model: nn.Module, limit_bytes: int | None) -> None:
        super().__init__(limit_bytes or physical_memory_bytes())
        # Weights and Adam's exp_avg and exp_avg_sq live across steps; the probe step creates
        # the gradients itself (the trainer's zero_grad sets them to None), so they are counted
        # inside the step.  Buffers are small and left out.
        self.static_bytes = 3 * parameter_bytes(model)

    def measure(self, step: Callable[[], None]) -> Measurement:
        with LiveTensors() as live:
            step()
        peak = live.peak_bytes + self.static_bytes
        return Measurement(peak <= self.limit_bytes, peak)


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_meter(model: nn.Module, device: torch.device, limit_gb: float | None) -> MemoryMeter:
    limit = int(limit_gb * 2**30) if limit_gb else None
    if device.type == "cuda":
        return CudaMeter(device, limit)
    return LiveTensorMeter(model, limit)


@dataclass(frozen=True)
class MicroBatchPlan:
    micro_batches: int
    micro_batch_size: int
    peak_bytes: int

    def describe(self, batch_size: int) -> str:
        if self.micro_batches == 1:
            return f"batch {batch_size} fits (peak ≈ {format_bytes(self.peak_bytes)})"
        return (
            f"batch {batch_size} split into {self.micro_batches} micro-batches of {self.micro_batch_size} "
            f"with gradient accumulation (same effective batch; peak ≈ {format_bytes(self.peak_bytes)})"
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
    processes: int = 1,
) -> MicroBatchPlan:
    """Fewest micro-batches (>= start) whose size fits; `probe(size)` runs one forward+backward.

    With `allow_split` False the configured split (`start_micro_batches`, the run's grad_accum)
    must fit as it is; otherwise the error names the largest (micro-)batch that does.  The batch
    is this process's share of train.batch_size, one of `processes` (for the messages).
    """
    cache: dict[int, Measurement] = {}

    def measure(size: int) -> Measurement:
        if size not in cache:
            cache[size] = meter.measure(lambda: probe(size))
        return cache[size]

    counts = divisors_from(batch_size, start_micro_batches)
    first = batch_size // counts[0]
    if measure(first).fits:
        return MicroBatchPlan(counts[0], first, measure(first).peak_bytes)
    limit = format_bytes(meter.limit_bytes)
    if not allow_split:
        largest = largest_fitting_size(measure, first)
        if largest == 0:
            hint = "not even a batch of 1 fits: use a smaller model or more memory"
        elif counts[0] == 1:
            hint = (
                f"the largest batch that fits is {largest}: set train.batch_size={largest}, or "
                "train.auto_microbatch=true to keep the batch and accumulate gradients"
            )
        else:
            hint = (
                f"the largest batch that fits is {largest} per micro-batch: set "
                f"train.batch_size={largest * counts[0]} (with grad_accum={counts[0]}), or "
                "train.auto_microbatch=true to keep the batch and accumulate gradients"
            )
        raise MemoryLimitError(
            f"a training step on batch {first} needs ≈ {format_bytes(measure(first).peak_bytes)}, "
            f"over the memory limit of {limit}; {hint}"
        )
    for previous, m in zip(counts, counts[1:], strict=False):
        size = batch_size // m
        if measure(size).fits:
            check_split_is_not_wasteful(measure, batch_size, m, size, batch_size // previous, processes)
            return MicroBatchPlan(m, size, measure(size).peak_bytes)
    raise MemoryLimitError(
        f"not even a micro-batch of 1 fits in {limit} "
        f"(needs ≈ {format_bytes(measure(1).peak_bytes)}): use a smaller model or more memory"
    )


def check_split_is_not_wasteful(
    measure: Callable[[int], Measurement],
    batch_size: int,
    count: int,
    size: int,
    too_big: int,
    processes: int,
) -> None:
    """Micro-batches split a batch evenly, so a batch with few divisors (a prime: 65537) can need
    far more of them than memory asks for, down to thousands of micro-batches of 1.  Where a
    micro-batch of twice the size would fit too, refuse, naming the nearest batch sizes that split
    into as few micro-batches as memory allows."""
    if 2 * size >= too_big or not measure(2 * size).fits:
        return
    largest = largest_fitting_size(measure, too_big, fits=2 * size)
    fewest = -(-batch_size // largest)  # micro-batches of at most `largest`
    lower, upper = batch_size - batch_size % fewest, batch_size - batch_size % fewest + fewest
    options = [b for b in (lower, upper) if b > 0 and -(-b // fewest) <= largest]
    near = " or ".join(f"train.batch_size={b * processes}" for b in options)
    per_process = " per process" if processes > 1 else ""
    raise MemoryLimitError(
        f"train.batch_size={batch_size * processes} splits evenly only into {count} micro-batches of "
        f"{size}{per_process}, though micro-batches of {largest} fit (peak ≈ "
        f"{format_bytes(measure(largest).peak_bytes)}); use {near} ({fewest} micro-batches each)"
    )


def largest_fitting_size(measure: Callable[[int], Measurement], too_big: int, fits: int = 0) -> int:
    """Binary search for the largest batch that fits below a size that does not (0 if none),
    above one known to fit (`fits`)."""
    low, high = fits, too_big  # low fits (0 trivially), high does not
    while high - low > 1:
        mid = (low + high) // 2
        if measure(mid).fits:
            low = mid
        else:
            high = mid
    return low
