"""Interleaved wall-clock timing: every case once per round, rounds repeated, medians reported.

Timing cases one after another lets slow drifts of the machine (other jobs on a shared CPU,
thermal throttling, a GPU's clocks) land on one case and not the other; interleaving spreads
them over every case alike, and the per-round ratio of two cases (`paired_ratio`) cancels what
is common to a round.  The order inside a round rotates, so no case always follows the same
neighbour (whose caches or allocator state it would inherit).

Each sample records wall-clock time and the process's CPU time (all its threads).  On a CPU
shared with other jobs the wall clock also counts the time the scheduler gave to others; CPU
time does not, so the ratio of CPU times is the steadier measure of work there (it still counts
threads spin-waiting for each other), and agreement of the two ratios says the wall ratio is
not an artefact of the load.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one case, in round order: wall clock, and CPU time if recorded."""

    name: str
    samples: list[float]
    cpu_samples: list[float] = field(default_factory=list)

    def cpu(self) -> "Timing":
        """The CPU-time samples as a Timing of their own (for medians and ratios)."""
        return Timing(self.name, self.cpu_samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(25th, 75th) percentile; both the single value when there is only one sample."""
        if len(self.samples) == 1:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]


@dataclass(frozen=True)
class RatioStats:
    """The ratio of two cases' times: of the medians, and the median and range of per-round ratios."""

    of_medians: float
    paired_median: float
    paired_min: float
    paired_max: float


def paired_ratio(numerator: Timing, denominator: Timing) -> RatioStats:
    per_round = [a / b for a, b in zip(numerator.samples, denominator.samples, strict=True)]
    return RatioStats(
        of_medians=numerator.median / denominator.median,
        paired_median=statistics.median(per_round),
        paired_min=min(per_round),
        paired_max=max(per_round),
    )


def rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def interleaved_timings(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
    on_sample: Callable[[str, int, float], None] | None = None,
) -> dict[str, Timing]:
    """Time every case `repeats` times, interleaved, after `warmup` untimed interleaved rounds.

    `sync` waits for queued device work (CUDA/MPS kernels run asynchronously) and is called
    before the clock starts and before it stops.  `on_sample(name, round, seconds)` reports
    progress (a CPU round of the paper's U-Net takes minutes).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not cases:
        raise ValueError("no cases to time")
    names = list(cases)
    for round_index in range(warmup):
        for name in rotated(names, round_index):
            cases[name]()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu_samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in rotated(names, round_index):
            sync()
            start, cpu_start = clock(), cpu_clock()
            cases[name]()
            sync()
            seconds = clock() - start
            samples[name].append(seconds)
            cpu_samples[name].append(cpu_clock() - cpu_start)
            if on_sample is not None:
                on_sample(name, round_index, seconds)
    return {name: Timing(name, samples[name], cpu_samples[name]) for name in names}
