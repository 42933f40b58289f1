"""A script's log: each line printed to the console and written to the script's log file."""

from pathlib import Path


class Tee:
    """Print to the console and to the script's log file."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "w")

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.handle.write(line + "\n")
        self.handle.flush()
