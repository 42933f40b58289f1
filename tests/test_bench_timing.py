"""The interleaved timing harness: order of calls, warm-up, medians and per-round ratios,
checked on fake workloads whose cost is known (sleeps, and a fake clock)."""

import time

import pytest

from zoo.bench.timing import Timing, interleaved_timings, paired_ratio


class FakeClock:
    """Time advances only when a workload says so: exact, noise-free durations."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rounds_interleave_with_rotating_order_after_untimed_warmup() -> None:
    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = interleaved_timings(cases, repeats=3, warmup=2)
    # Warm-up rounds and timed rounds all run every case once per round, the order rotating.
    assert calls == list("abcbcaabcbcacab")
    assert {name: len(t.samples) for name, t in timings.items()} == {"a": 3, "b": 3, "c": 3}


def test_medians_of_known_durations_with_an_outlier_and_sync_around_every_sample() -> None:
    clock = FakeClock()
    durations = {"fast": [1.0, 1.0, 50.0, 1.0, 1.0], "slow": [3.0, 2.0, 3.0, 3.0, 4.0]}
    seen = {name: 0 for name in durations}
    sync_calls: list[float] = []

    def workload(name: str) -> None:
        clock.now += durations[name][seen[name]]
        seen[name] += 1

    timings = interleaved_timings(
        {name: (lambda name=name: workload(name)) for name in durations},
        repeats=5,
        warmup=0,
        sync=lambda: sync_calls.append(clock.now),
        clock=clock,
        cpu_clock=lambda: clock.now / 2,  # as if another job took half the machine
    )
    assert timings["fast"].samples == durations["fast"]
    assert timings["fast"].median == 1.0  # the 50 s outlier does not move the median
    assert timings["slow"].median == 3.0
    assert timings["slow"].quartiles == (3.0, 3.0)
    assert timings["fast"].cpu_samples == [d / 2 for d in durations["fast"]]
    assert timings["slow"].cpu().median == 1.5
    assert len(sync_calls) == 2 * 10 + 1  # before and after each sample, once after warm-up
    ratio = paired_ratio(timings["slow"], timings["fast"])
    assert ratio.of_medians == 3.0
    assert ratio.paired_median == 3.0
    assert ratio.paired_min == pytest.approx(3.0 / 50.0) and ratio.paired_max == 4.0


def test_real_sleeps_are_measured_and_interleaving_spreads_a_slow_period_over_all_cases() -> None:
    # A "machine slowdown" during round 1 hits every case of that round; the medians stay at
    # the true values.  Sleeping takes wall time but no CPU time.
    round_of = {"n": 0}
    slow_round = 1

    def sleeper(seconds: float):
        def run() -> None:
            extra = 0.3 if round_of["n"] // 2 == slow_round else 0.0
            round_of["n"] += 1
            time.sleep(seconds + extra)

        return run

    timings = interleaved_timings({"a": sleeper(0.05), "b": sleeper(0.15)}, repeats=3, warmup=0)
    # Sleeps overshoot by the scheduler's latency on a busy machine, never undershoot.
    assert 0.05 <= timings["a"].median < 0.1
    assert 0.15 <= timings["b"].median < 0.2
    assert timings["a"].samples[slow_round] >= 0.35 and timings["b"].samples[slow_round] >= 0.45
    assert paired_ratio(timings["b"], timings["a"]).of_medians == pytest.approx(3.0, rel=0.35)
    assert max(timings["a"].cpu_samples + timings["b"].cpu_samples) < 0.02


def test_timing_statistics_and_bad_arguments() -> None:
    one = Timing("x", [2.0])
    assert one.median == 2.0 and one.quartiles == (2.0, 2.0)
    four = Timing("y", [1.0, 2.0, 3.0, 4.0])
    assert four.median == 2.5 and four.quartiles == (1.75, 3.25)
    with pytest.raises(ValueError, match="repeats"):
        interleaved_timings({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        interleaved_timings({"a": lambda: None}, repeats=1, warmup=-1)
    with pytest.raises(ValueError, match="no cases"):
        interleaved_timings({}, repeats=1)
