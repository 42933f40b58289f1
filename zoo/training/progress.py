"""The training progress bar: step, loss, it/s and ETA, on stderr so stdout stays parseable."""

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, console: Console, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rich = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.rich.add_task("training", total=total, completed=start, loss="-", rate="-")

    def __enter__(self) -> "TrainProgress":
        self.rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.rich.__exit__(*exc)

    def update(self, step: int, loss: float) -> None:
        self.rich.update(self.task, completed=step, loss=f"{loss:.4f}")
        speed = self.rich.tasks[self.task].speed
        if speed:
            self.rich.update(self.task, rate=f"{speed:.2f}")
