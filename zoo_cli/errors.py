"""Turning the library's user-facing errors into one clear line and a non-zero exit code."""

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from zoo.config.loading import ConfigError
from zoo.errors import (
    CheckpointError,
    CompileError,
    DataNotFoundError,
    DeviceError,
    FidUnavailableError,
    FidUnsupportedError,
    MetricInputError,
    MissingAssetError,
    MissingCheckpointError,
    MissingDependencyError,
    NonFiniteCheckpointError,
    OutputPathError,
)
from zoo.runs import CheckpointReplacedError, DivergedError, RunError

err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line in pipes and CI logs

# Exit 2 for input the user must change (config, arguments), 1 for things that failed.
# Checked first: failures whose classes derive from a usage error's.
FAILURES: tuple[type[Exception], ...] = (DivergedError, CheckpointReplacedError)
USAGE_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    # Before RUNTIME_ERRORS' CheckpointError (a damaged file): pick another checkpoint.
    MissingCheckpointError,
    NonFiniteCheckpointError,
    OutputPathError,
    # A run folder that cannot be used as asked: a name taken, nothing to resume, another
    # process training it, a batch over the memory limit, a config or device that differs from
    # the checkpoint's. Each message names the option to change.
    RunError,
    FidUnsupportedError,
    MetricInputError,
    MissingAssetError,
    MissingDependencyError,
)
RUNTIME_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError,
    DeviceError,
    DataNotFoundError,
    CompileError,
    FidUnavailableError,
)


def fail(message: str, code: int = 2) -> typer.Exit:
    # The message is plain text: "[m]*" in a pattern it quotes is not rich markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except FAILURES as exc:
        raise fail(str(exc), 1) from None
    except USAGE_ERRORS as exc:
        raise fail(str(exc), 2) from None
    except RUNTIME_ERRORS as exc:
        raise fail(str(exc), 1) from None
