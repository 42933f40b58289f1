"""`zoo bench-jvp`: interleaved timing of the JVP, flow-matching and MeanFlow steps."""

from zoo.bench.jvp_bench import BenchResult, BenchSettings, run_bench
from zoo.bench.timing import Timing, interleaved_timings, paired_ratio

__all__ = [
    "BenchResult",
    "BenchSettings",
    "Timing",
    "interleaved_timings",
    "paired_ratio",
    "run_bench",
]
