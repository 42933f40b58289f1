"""Experiment tracking through trackio, which stores runs in a local SQLite database.

Works offline: the database lives under TRACKIO_DIR (trackio's default when unset), and
`trackio show` / `trackio get metric --project P --run R --metric train/loss` read it back.
Resuming a run passes its config again because trackio wipes a resumed run's stored config
otherwise.
"""

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Tracker(ABC):
    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_image(self, key: str, image: np.ndarray, step: int, caption: str = "") -> None: ...

    @abstractmethod
    def finish(self) -> None: ...


class NullTracker(Tracker):
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
        pass

    def finish(self) -> None:
        pass


class TrackioTracker(Tracker):
    def __init__(self, project: str, run_name: str, config: dict[str, Any], resume: bool) -> None:
        import trackio  # imported late: it reads TRACKIO_DIR at import time

        self._trackio = trackio
        trackio.init(
            project=project,
            name=run_name,
            config=config,
            resume="allow" if resume else "never",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._trackio.log(dict(metrics), step=step)

    def log_image(self, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
        self._trackio.log({key: self._trackio.Image(image, caption=caption)}, step=step)

    def finish(self) -> None:
        self._trackio.finish()


def make_tracker(enabled: bool, project: str, run_name: str, config: dict[str, Any], resume: bool) -> Tracker:
    if not enabled:
        return NullTracker()
    return TrackioTracker(project, run_name, config, resume)
