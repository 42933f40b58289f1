"""Loss spikes: detected against the running median, printed, recorded and counted."""

from types import SimpleNamespace

from rich.console import Console

from zoo.tracking import Tracker
from zoo.training.spikes import SpikeDetector
from zoo.training.trainer import record_spikes


def test_a_value_far_above_the_running_median_is_a_spike():
    detector = SpikeDetector(window=50, factor=5.0, min_history=10)
    for step in range(9):
        assert detector.update(step, {"mse": 100.0 if step == 3 else 1.0}) == []  # too little history
    spikes = []
    for step in range(9, 40):
        value = {20: 6.0, 30: 4.9}.get(step, 1.0 + 0.01 * (step % 3))
        spikes += detector.update(step, {"mse": value, "max_sample_mse": 2.0})
    assert [(s.step, s.metric) for s in spikes] == [(20, "mse")]
    assert spikes[0].ratio > 5 and detector.count == 1
    # The spike itself does not raise the bar: the median stays ~1.
    assert detector.update(40, {"mse": 5.5})[0].median < 1.1
    restored = SpikeDetector(window=50, factor=5.0, min_history=10)
    restored.load_state_dict(detector.state_dict())
    assert restored.count == 2 and restored.update(41, {"mse": 6.0})


class Recorder(Tracker):
    def __init__(self) -> None:
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def log_image(self, key, image, step, caption=""):
        pass

    def finish(self):
        pass


def test_the_trainer_prints_records_and_counts_each_spike():
    console = Console(record=True, width=200)
    rows = []
    state = SimpleNamespace(spikes=SpikeDetector(min_history=3), step=0)
    run = SimpleNamespace(append_metrics=rows.append)
    progress = SimpleNamespace(rich=SimpleNamespace(console=console))
    tracker = Recorder()
    for step, value in enumerate([1.0, 1.0, 1.0, 1.0, 50.0, 1.0]):
        state.step = step
        record_spikes(state, run, tracker, progress, {"loss": 1.0, "mse": value})
    assert tracker.logged == [(4, {"train/spike_ratio/mse": 50.0, "train/spikes": 1})]
    assert rows[0]["step"] == 4 and rows[0]["train/spikes"] == 1
    assert "loss spike at step 4: mse 50 is 50.0x its running median 1" in console.export_text()
