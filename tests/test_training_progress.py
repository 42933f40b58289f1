"""The training progress line on an 80-column terminal: the bar gives way, the loss never does."""

import io

import pytest
from rich.console import Console

from zoo.training.progress import TrainProgress


@pytest.mark.parametrize("total, step", [(300, 22), (300, 300), (100_000, 54_321)])
def test_the_loss_is_shown_in_80_columns(total, step):
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    progress = TrainProgress(console, total, 0)
    progress.update(step, {"loss": 1.88504, "mse": 0.61234})
    progress.rich.update(progress.task, rate="22.47")
    console.print(progress.rich.make_tasks_table(progress.rich.tasks))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines  # one line: no field wrapped onto a second
    assert f"{step}/{total}" in lines[0] and "loss 1.8850" in lines[0] and "mse 0.6123" in lines[0]
    assert "22.47 it/s" in lines[0]
