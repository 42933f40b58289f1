"""The training progress bar: step, loss, it/s and ETA, on stderr so stdout stays parseable."""

from rich.console import Console
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
from rich.text import Text


class FieldColumn(ProgressColumn):
    """A task field, blank for tasks without it (evaluation shares the display)."""

    def __init__(self, field: str, template: str) -> None:
        super().__init__()
        self.field = field
        self.template = template

    def render(self, task: Task) -> Text:
        value = task.fields.get(self.field)
        return Text(self.template.format(value) if value is not None else "")


class TrainProgress:
    def __init__(self, console: Console, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rich = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            FieldColumn("loss", "loss {}"),
            FieldColumn("mse", "mse {}"),
            FieldColumn("rate", "{} it/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.rich.add_task("training", total=total, completed=start, loss="-", mse="-", rate="-")

    def __enter__(self) -> "TrainProgress":
        self.rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.rich.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        # With the adaptive weight (p = 1) the loss sits near 1 by construction; the raw mse moves.
        self.rich.update(
            self.task, completed=step, loss=f"{metrics['loss']:.4f}", mse=f"{metrics.get('mse', float('nan')):.4f}"
        )
        speed = self.rich.tasks[self.task].speed
        if speed:
            self.rich.update(self.task, rate=f"{speed:.2f}")
