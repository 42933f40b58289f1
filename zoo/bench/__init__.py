"""Benchmarks and calibration: interleaved timing, `zoo bench-jvp`, and `loss.jvp = auto`."""

from zoo.bench.calibration import Calibration, calibrate, choose_jvp_mode, resolve_for_training
from zoo.bench.jvp_bench import BenchResult, BenchSettings, run_bench
from zoo.bench.timing import Timing, interleaved_timings, paired_ratio

__all__ = [
    "BenchResult",
    "BenchSettings",
    "Calibration",
    "Timing",
    "calibrate",
    "choose_jvp_mode",
    "interleaved_timings",
    "paired_ratio",
    "resolve_for_training",
    "run_bench",
]
