"""Loss spikes: a step whose error is far above its recent typical value.

Late in training MeanFlow-family objectives are reported to spike (the u-loss at high t, through
du/dt, while the v-loss stays flat).  The trainer watches each step's raw error `mse` (the adaptive
weight keeps `loss` near 1 whatever happens) and its largest per-sample error where the loss
reports one:

    a spike: value > FACTOR x the median of the previous WINDOW steps' values (once MIN_HISTORY are known)

The median, not the mean, so that one spike does not raise the bar for the next.  A loss that
changes what it computes (alpha-Flow's switch to the MeanFlow target, reported as `jvp_path`)
starts a new history: a new target's level is not a spike.  Each spike is recorded in
metrics.jsonl and trackio (train/spike_ratio at its step) and counted (train/spikes, in every
logged record and in the checkpoint); the console gets at most one line per QUIET_STEPS steps,
with the count of those it did not print, so a burst does not bury the progress bar.
"""

import statistics
from collections import deque
from dataclasses import dataclass

WINDOW = 200
FACTOR = 5.0
MIN_HISTORY = 20
WATCHED = ("mse", "max_sample_mse")  # per metric, in the order reported
PATH = "jvp_path"  # which computation the loss ran; a change starts a new history
QUIET_STEPS = 100


@dataclass(frozen=True)
class Spike:
    step: int
    metric: str
    value: float
    median: float

    @property
    def ratio(self) -> float:
        return self.value / self.median

    def describe(self) -> str:
        return (
            f"loss spike at step {self.step}: {self.metric} {self.value:.4g} is {self.ratio:.1f}x "
            f"its running median {self.median:.4g}"
        )


class SpikeDetector:
    def __init__(self, window: int = WINDOW, factor: float = FACTOR, min_history: int = MIN_HISTORY) -> None:
        self.factor = factor
        self.min_history = min_history
        self.history: dict[str, deque[float]] = {name: deque(maxlen=window) for name in WATCHED}
        self.count = 0
        self.path: float | None = None
        self.printed_at: int | None = None  # the step of the last spike shown on the console
        self.unprinted = 0

    def to_print(self, step: int) -> tuple[bool, int]:
        """Whether this step's spikes get a console line, and how many spike steps since the last
        line went unprinted (call once per step with spikes)."""
        if self.printed_at is not None and step - self.printed_at < QUIET_STEPS:
            self.unprinted += 1
            return False, 0
        skipped, self.unprinted, self.printed_at = self.unprinted, 0, step
        return True, skipped

    def update(self, step: int, metrics: dict[str, float]) -> list[Spike]:
        """The spikes of this step's metrics (then added to the history)."""
        spikes = []
        path = metrics.get(PATH)
        if path != self.path:
            for past in self.history.values():
                past.clear()
            self.path = path
        for name, past in self.history.items():
            if name not in metrics:
                continue
            value = metrics[name]
            if len(past) >= self.min_history:
                median = statistics.median(past)
                if median > 0 and value > self.factor * median:
                    spikes.append(Spike(step, name, value, median))
            past.append(value)
        self.count += bool(spikes)
        return spikes

    def state_dict(self) -> dict:
        return {
            "count": self.count,
            "path": self.path,
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.path = state.get("path")  # absent from checkpoints written before paths were kept
        for name, values in state["history"].items():
            self.history[name].clear()
            self.history[name].extend(values)
