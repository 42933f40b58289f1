"""`zoo features train DATASET`: (re)build the feature network behind FD/KID/precision/recall."""

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from zoo_cli.errors import fail, user_errors
from zoo_cli.render import make_console

app = typer.Typer(no_args_is_help=True, help="Feature networks for FD, KID and precision/recall.")
console = make_console()


@contextlib.contextmanager
def training_bar(console: Console, title: str) -> Iterator[Callable[[int, int, float], None]]:
    """An `on_step(step, steps, loss)` callback drawing a rich progress bar, shown from the first
    step (a cached net never calls it, so nothing is drawn then)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task: list[int] = []

    def on_step(step: int, steps: int, loss: float) -> None:
        if not task:
            progress.start()
            task.append(progress.add_task(title, total=steps, loss=loss))
        progress.update(task[0], completed=step, loss=loss)

    try:
        yield on_step
    finally:
        progress.stop()


@app.command("train")
def train_command(
    dataset: Annotated[
        str, typer.Argument(help="fashion-mnist | digits | cifar10 | imagenet (class folders)")
    ],
    data_dir: Annotated[Path, typer.Option(help="folder holding the datasets (data.root)")] = Path("data"),
    image_size: Annotated[
        int | None, typer.Option(min=8, help="class-folder datasets: the image size the runs use")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[int, typer.Option(min=0, help="CPU threads (0 = torch default)")] = 0,
) -> None:
    """Train DATASET's feature network (replacing a cached one), check it against its accuracy
    floor and cache it under $ZOO_CACHE_DIR/feature-nets."""
    from typing import get_args

    from zoo.config.schema import DataConfig, DatasetName

    if dataset not in get_args(DatasetName):
        raise fail(f"unknown dataset {dataset!r}: one of {', '.join(get_args(DatasetName))}")
    import torch

    from zoo.metrics.features import build_feature_net, config_for

    if threads:
        torch.set_num_threads(threads)
    data = DataConfig(name=dataset, root=str(data_dir), image_size=image_size)
    with user_errors():
        config = config_for(data)
        console.print(f"feature network for [bold]{dataset}[/]: {config.to_dict()}")
        with training_bar(console, f"training {dataset}'s feature net") as on_step:
            net = build_feature_net(data, config, device=device, on_step=on_step)
    console.print(
        f"test accuracy [bold]{net.test_accuracy:.2%}[/] (floor {config.min_accuracy:.0%}), "
        f"trained in {net.train_seconds:.0f} s; {net.dim}-D features; sha256 {net.sha256[:16]}…\n"
        f"cached at {net.path}"
    )
