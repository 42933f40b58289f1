"""What each torchrun process runs for `zoo train --nproc N`: the same train_run as one process.

A user error (a config, a missing run or dataset) ends each process with the exit code of
`zoo train` and rank 0's one "error:" line, not a traceback per rank.
"""

import json
import os
import sys
from pathlib import Path

import typer
from rich.markup import escape

from zoo import distributed
from zoo.config.loading import config_from_dict
from zoo.devices import resolve_device
from zoo.runs import RunInterrupted
from zoo.training.trainer import train_run
from zoo_cli import errors
from zoo_cli.errors import user_errors


def main(argv: list[str] | None = None) -> int:
    config_path, mode = argv or sys.argv[1:3]
    # Every rank meets the same user error; rank 0's line says it once (torchrun sets RANK).
    errors.err_console.quiet = int(os.environ.get("RANK", "0")) > 0
    try:
        with user_errors():
            cfg = config_from_dict(json.loads(Path(config_path).read_text()))
            # The run's device decides the backend (gloo for --device cpu even on a GPU machine).
            distributed.init(device_type=resolve_device(cfg.device).type)
            train_run(
                cfg,
                resume=mode == "--resume",
                restart=mode == "--restart",
                command=f"zoo train --nproc {distributed.world_size()}",
            )
    except typer.Exit as exc:
        return exc.exit_code
    except RunInterrupted as exc:  # SIGINT/SIGTERM: rank 0 saved the step reached and says how to resume
        if not errors.err_console.quiet:
            errors.err_console.print(f"[bold yellow]{escape(str(exc))}[/]", highlight=False, markup=True)
        return exc.exit_code
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
