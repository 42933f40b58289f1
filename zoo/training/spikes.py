"""Loss spikes: a step whose error is far above its recent typical value.

Late in training MeanFlow-family objectives are reported to spike (the u-loss at high t, through
du/dt, while the v-loss stays flat).  The trainer watches each step's raw error `mse` (the adaptive
weight keeps `loss` near 1 whatever happens) and its largest per-sample error where the loss
reports one:

    a spike: value > FACTOR x the median of the previous WINDOW steps' values (once MIN_HISTORY are known)

The median, not the mean, so that one spike does not raise the bar for the next.  Each spike is
printed, recorded in metrics.jsonl and trackio (train/spike_ratio at its step) and counted
(train/spikes, in every logged record and in the checkpoint).
"""

import statistics
from collections import deque
from dataclasses import dataclass

WINDOW = 200
FACTOR = 5.0
MIN_HISTORY = 20
WATCHED = ("mse", "max_sample_mse")  # per metric, in the order reported


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

    def update(self, step: int, metrics: dict[str, float]) -> list[Spike]:
        """The spikes of this step's metrics (then added to the history)."""
        spikes = []
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
        return {"count": self.count, "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        for name, values in state["history"].items():
            self.history[name].clear()
            self.history[name].extend(values)
