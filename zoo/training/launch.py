"""torchrun, plus a machine-readable record of how its processes ended.

When one rank dies — a Python error, or a signal such as the SIGKILL the host's OOM killer
sends — torchrun stops the others and exits with code 1, the code of any Python error, and
says which rank died of what only in a text summary.  This runs the same launcher
(`torch.distributed.run`) and, when a rank fails, also writes that summary as JSON:

    python -m zoo.training.launch --failures-file PATH <torchrun arguments>

    {"failures": [{"rank": 1, "local_rank": 1, "exitcode": -9, "signal": "SIGKILL", "message": "..."}],
     "first_rank": 1}

`exitcode` is negative for a process killed by a signal.  The remote supervisor reads the file
to tell a killed rank from an ordinary crash (zoo.remote.worker.collect_failure).
"""

import sys
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from zoo.runs import atomic_write_json

FLAG = "--failures-file"


def failure_record(exc: ChildFailedError) -> dict[str, Any]:
    first_rank, _ = exc.get_first_failure()
    failures = [
        {
            "rank": rank,
            "local_rank": failure.local_rank,
            "exitcode": failure.exitcode,
            "signal": failure.signal_name() if failure.exitcode < 0 else None,
            "message": failure.message,  # a string, or the JSON of an error file
        }
        for rank, failure in sorted(exc.failures.items())
    ]
    return {"failures": failures, "first_rank": first_rank}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != FLAG:
        raise SystemExit(f"usage: python -m zoo.training.launch {FLAG} PATH <torchrun arguments>")
    failures_file, torchrun_args = Path(argv[1]), argv[2:]
    try:
        torchrun_main(torchrun_args)
    except ChildFailedError as exc:
        atomic_write_json(failures_file, failure_record(exc))
        raise  # torchrun's own summary still reaches the log, and the exit code stays 1


if __name__ == "__main__":
    main(sys.argv[1:])
