"""Options several commands share, each with the bounds every command applies to it.

A seed, a device, a thread count or a number of network evaluations means the same in `zoo
train`, `zoo sample`, `zoo eval`, `zoo fid`, `zoo bench-jvp` and `zoo data`, and is refused the
same way: before any work, in one line.
"""

import re
from typing import Annotated

import typer

from zoo.config.schema import DEVICE_CHOICES, DEVICE_PATTERN, MAX_NFE, MAX_SEED, MAX_THREADS
from zoo_cli.errors import fail


def check_device(value: str | None) -> str | None:
    """A device name torch and zoo both know, said in one line before torch is even imported."""
    if value is not None and not re.fullmatch(DEVICE_PATTERN, value):
        raise fail(f"--device {value!r} is not a device zoo can use; choose one of {DEVICE_CHOICES}")
    return value


DeviceOption = Annotated[str, typer.Option(callback=check_device, help=DEVICE_CHOICES.replace(",", " |"))]
SeedOption = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="random seed (0 to 2**32 - 1)")]
ThreadsOption = Annotated[
    int, typer.Option(min=0, max=MAX_THREADS, help="CPU threads (0 = torch default; 1 on a shared machine)")
]
NfeOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=MAX_NFE,
        help="network evaluations (default: 1 = one-step MeanFlow; when integrating the ODE, "
        f"the run's largest eval.solver_nfe, rounded up to the solver's calls per step; at most {MAX_NFE})",
    ),
]
