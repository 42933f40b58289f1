"""Progress: the training bar (step, loss, it/s and ETA, on stderr so stdout stays parseable, and
below it what a held Ctrl-C/SIGTERM waits for), and the heartbeat kept fresh through long phases
without training steps."""

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from zoo.interrupts import StopSignals
from zoo.runs import RunDir

# How often, at most, a long phase rewrites heartbeat.json (one small fsynced file; on Modal, on
# the Volume): far below any sensible --stall-after, far above the time of one write.
PHASE_HEARTBEAT_EVERY_S = 30.0


def fixed() -> Column:
    """A column that keeps its full width: only the bar gives way on a narrow terminal."""
    return Column(no_wrap=True)


class FieldColumn(ProgressColumn):
    """A task field, blank for tasks without it (evaluation shares the display)."""

    def __init__(self, field: str, template: str) -> None:
        super().__init__(table_column=fixed())
        self.field = field
        self.template = template

    def render(self, task: Task) -> Text:
        value = task.fields.get(self.field)
        return Text(self.template.format(value) if value is not None else "")


class NoticeProgress(Progress):
    """A rich Progress with a line of notice under its tasks while `notice()` has one.

    rich's refresh thread redraws it about ten times a second, so a notice set by a signal handler
    shows within a step however long the step takes, without the handler touching the display."""

    def __init__(self, *columns: ProgressColumn, notice: Callable[[], str | None], **kwargs) -> None:
        self.notice = notice  # first: building the display draws it
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        notice = self.notice()
        if notice is not None:
            yield Text(notice, style="bold yellow")


class TrainProgress:
    def __init__(
        self, console: Console, total: int, start: int, stops: StopSignals, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.stops = stops
        # Live only on a terminal (as rich's Live decides): in a log file or a pipe the bar is drawn
        # once at the end, and the signal handler writes its plain line instead.
        self.live = enabled and console.is_terminal and not console.is_dumb_terminal
        # The loss is the number people watch: every field keeps its width and the bar takes what
        # is left (80 columns hold a 6-digit step counter), down to a few cells.
        self.rich = NoticeProgress(
            TextColumn("[bold]{task.description}", table_column=fixed()),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=3)),
            MofNCompleteColumn(table_column=fixed()),
            FieldColumn("loss", "loss {}"),
            FieldColumn("mse", "mse {}"),
            FieldColumn("rate", "{} it/s"),
            TimeElapsedColumn(table_column=fixed()),
            TextColumn("ETA", table_column=fixed()),
            TimeRemainingColumn(table_column=fixed()),
            console=console,
            disable=not enabled,
            notice=stops.notice,
        )
        self.task = self.rich.add_task("training", total=total, completed=start, loss="-", mse="-", rate="-")

    def __enter__(self) -> "TrainProgress":
        self.rich.__enter__()
        self.stops.shown_live = self.live
        return self

    def __exit__(self, *exc) -> None:
        self.stops.shown_live = False
        try:
            self.rich.__exit__(*exc)  # draws the bar a last time
        except (OSError, SystemExit):  # rich turns EPIPE (nobody reading any more) into SystemExit(1)
            # `zoo train ... 2>&1 | tee log` whose tee ended (the same Ctrl-C, or closed by hand):
            # the bar is only a display; its failure must replace neither a stop in flight, which
            # still has its checkpoint to save, nor a finished run's final records.
            pass

    def update(self, step: int, metrics: dict[str, float]) -> None:
        # With the adaptive weight (p = 1) the loss sits near 1 by construction; the raw mse moves.
        self.rich.update(
            self.task,
            completed=step,
            loss=f"{metrics['loss']:.4f}",
            mse=f"{metrics.get('mse', float('nan')):.4f}",
        )
        speed = self.rich.tasks[self.task].speed
        if speed:
            self.rich.update(self.task, rate=f"{speed:.2f}")


class PhaseHeartbeat:
    """Marks the heartbeat with a phase ("eval") and keeps it fresh while the phase lasts.

    Training steps refresh the heartbeat at every log step; an evaluation can run for far longer
    than `zoo modal status --stall-after` without one.  Call this after each piece of work (a
    sampled batch, a metric): it rewrites heartbeat.json at most every PHASE_HEARTBEAT_EVERY_S.
    """

    def __init__(self, run: RunDir, phase: str) -> None:
        self.run = run
        self.phase = phase
        self.every_s = PHASE_HEARTBEAT_EVERY_S
        self._beat()

    def _beat(self) -> None:
        self.run.write_heartbeat(status="running", phase=self.phase)
        self.last = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self._beat()


@contextlib.contextmanager
def step_bar(console: Console, description: str) -> Iterator[Callable[[int, int, float], None]]:
    """A bar for work reported as on_step(step, steps, loss), such as training a feature network
    on first use; the callback it yields moves the bar."""
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=None, loss=float("nan"))

        def on_step(step: int, steps: int, loss: float) -> None:
            progress.update(task, total=steps, completed=step, loss=loss)

        yield on_step
