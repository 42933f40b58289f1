"""Loss spikes: detected against the running median, printed, recorded and counted."""

from types import SimpleNamespace

import pytest
import torch
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


def trainer_parts():
    """What record_spikes writes to: (console, metrics rows, state, run, progress)."""
    console = Console(record=True, width=300)
    rows = []
    state = SimpleNamespace(spikes=SpikeDetector(min_history=3), step=0)
    run = SimpleNamespace(append_metrics=rows.append)
    progress = SimpleNamespace(rich=SimpleNamespace(console=console))
    return console, rows, state, run, progress


def test_the_trainer_prints_records_and_counts_each_spike():
    console, rows, state, run, progress = trainer_parts()
    tracker = Recorder()
    for step, value in enumerate([1.0, 1.0, 1.0, 1.0, 50.0, 1.0]):
        state.step = step
        record_spikes(state, run, tracker, progress, {"loss": 1.0, "mse": value})
    assert tracker.logged == [(4, {"train/spike_ratio/mse": 50.0, "train/spikes": 1})]
    assert rows[0]["step"] == 4 and rows[0]["train/spikes"] == 1
    assert "loss spike at step 4: mse 50 is 50.0x its running median 1" in console.export_text()


def test_a_new_loss_path_starts_a_new_history():
    """alpha-Flow's switch to the MeanFlow target raises the error's level for good: not a spike,
    whereas the same jump without a change of path is one."""
    for path_after, spiked in ((1.0, False), (0.0, True)):
        detector = SpikeDetector(window=50, factor=5.0, min_history=10)
        spikes = []
        for step in range(60):
            switched = step >= 30
            metrics = {"mse": 8.0 if switched else 1.0, "jvp_path": path_after if switched else 0.0}
            spikes += detector.update(step, metrics)
        assert bool(spikes) == spiked and all(s.step >= 30 for s in spikes)


def test_a_burst_of_spikes_prints_one_line_per_quiet_period_and_records_every_one():
    console, rows, state, run, progress = trainer_parts()
    # Every third step spikes from step 21 on: two thirds of the history stay 1, so does the median.
    values = [50.0 if step > 20 and step % 3 == 0 else 1.0 for step in range(300)]
    for step, value in enumerate(values):
        state.step = step
        record_spikes(state, run, Recorder(), progress, {"loss": 1.0, "mse": value})
    lines = [line for line in console.export_text().splitlines() if "loss spike" in line]
    spiked = [row["step"] for row in rows]
    assert spiked == list(range(21, 300, 3)) and state.spikes.count == len(spiked)
    shown = ["loss spike at step 21", "loss spike at step 123", "loss spike at step 225"]
    assert [line.split(":")[0] for line in lines] == shown
    # 24, 27, ..., 120 between the first two lines: 33 spike steps not printed
    assert "(33 more spike steps since the last one shown)" in lines[1]


def test_a_step_of_micro_batches_reports_the_largest_sample_loss_and_the_mean_loss(monkeypatch):
    """The spike watch reads a step's largest per-sample loss: over micro-batches it is the largest
    of theirs, while the mean losses average."""
    from zoo.config.loading import load_config
    from zoo.training import trainer

    cfg = load_config(
        "moons",
        [
            "loss.kind=imf",
            "model.v_head=1",
            "model.hidden=16",
            "model.depth=2",
            "train.batch_size=32",
            "train.grad_accum=4",
            "device=cpu",
            "run_name=micro",
        ],
    )
    state = trainer.build_state(cfg, torch.device("cpu"))
    seen = []
    backward = trainer.micro_batch_backward

    def recording(s: trainer.TrainState) -> dict[str, torch.Tensor]:
        metrics = backward(s)
        seen.append({key: float(value) for key, value in metrics.items()})
        return metrics

    monkeypatch.setattr(trainer, "micro_batch_backward", recording)
    totals = trainer.train_step(state)
    assert len(seen) == 4
    per_micro = [m["max_sample_mse"] for m in seen]
    assert len(set(per_micro)) == 4  # distinct, so a mean could not pass for the max
    assert totals["max_sample_mse"] == max(per_micro)
    assert totals["mse"] == pytest.approx(sum(m["mse"] for m in seen) / 4, rel=1e-6)  # float32 sums
