"""The training progress line on an 80-column terminal (the bar gives way, the loss never does),
and what it shows under the bar when a signal is held for the step in progress."""

import io
import os
import signal
import time

import pytest
from rich.console import Console

from zoo import distributed
from zoo.interrupts import StopRequested, StopSignals
from zoo.training.progress import TrainProgress

HELD = "stopping after this step — saving a checkpoint"


def rendered(progress: TrainProgress) -> str:
    """The display as its refresh thread draws it, on one long line per row."""
    out = io.StringIO()
    Console(file=out, width=300, color_system=None).print(progress.rich.get_renderable())
    return out.getvalue()


def signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs at the next bytecode of this (the main) thread


@pytest.mark.parametrize("total, step", [(300, 22), (300, 300), (100_000, 54_321)])
def test_the_loss_is_shown_in_80_columns(total, step):
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    progress = TrainProgress(console, total, 0, StopSignals())
    progress.update(step, {"loss": 1.88504, "mse": 0.61234})
    progress.rich.update(progress.task, rate="22.47")
    console.print(progress.rich.make_tasks_table(progress.rich.tasks))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines  # one line: no field wrapped onto a second
    assert f"{step}/{total}" in lines[0] and "loss 1.8850" in lines[0] and "mse 0.6123" in lines[0]
    assert "22.47 it/s" in lines[0]


def test_a_held_signal_shows_under_a_live_bar_and_a_second_one_is_acknowledged(capfd):
    """On a terminal the bar says it; the handler itself writes nothing (it could tear the bar)."""
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    with StopSignals() as stops, TrainProgress(terminal, 300, 0, stops) as progress:
        with stops.held(HELD):
            assert HELD not in rendered(progress)
            signal_self(signal.SIGINT)
            shown = rendered(progress)
            assert HELD in shown and "kill -9" not in shown
            signal_self(signal.SIGINT)  # still held: a second Ctrl-C must not cut the step short
            shown = " ".join(rendered(progress).split())
            assert HELD in shown
            assert (
                "Ctrl-C again: ignored, so the checkpoint is written whole; "
                f"`kill -9 {os.getpid()}` stops at once" in shown
            )
        with pytest.raises(StopRequested):
            stops.check("cpu")
    assert capfd.readouterr().err == ""


def test_without_a_live_bar_rank_0_writes_a_plain_line_per_signal(capfd):
    """In a log file or a pipe the bar is drawn only at the end: a plain line says it at once."""
    log = Console(file=io.StringIO(), width=120)
    with StopSignals() as stops, TrainProgress(log, 300, 0, stops):
        with stops.held(HELD):
            signal_self(signal.SIGTERM)
            assert capfd.readouterr().err == HELD + "\n"
            signal_self(signal.SIGTERM)
            line = capfd.readouterr().err
            assert line.startswith(
                f"SIGTERM again: ignored, so the checkpoint is written whole; `kill -9 {os.getpid()}`"
            )
            assert line.count("\n") == 1
    assert stops.signum == signal.SIGTERM


def test_other_ranks_say_nothing(capfd, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    with StopSignals() as stops, TrainProgress(Console(file=io.StringIO()), 300, 0, stops, enabled=False):
        with stops.held(HELD):
            signal_self(signal.SIGINT)
            signal_self(signal.SIGINT)
    assert stops.signum == signal.SIGINT and capfd.readouterr().err == ""
