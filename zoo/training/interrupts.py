"""SIGINT (Ctrl-C) and SIGTERM (`timeout`, schedulers, the remote supervisor) as a request to stop.

A signal that arrives during a training step (or while a checkpoint is being written) is held
until the step is complete, so the run can stop on a checkpoint of a whole step; at any other
time (calibration, evaluation) a single process stops at once: those never change the training
state.  Under torchrun a rank never stops on its own while the ranks work together: they ask each
other once before the run folder is written and after each step, so all of them stop at the same
point (a rank that stopped alone would leave the others waiting in the next all-reduce); after the
loop, where rank 0 alone evaluates, it stops at once again (act_alone).

Further signals while stopping are ignored, so that a second Ctrl-C, or torchrun passing the
terminal's signal on to its processes, cannot cut the final checkpoint short; SIGKILL still ends
the process at once.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import torch

from zoo.training import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """Raised inside the trainer when a signal asks it to stop; train_run turns it into RunInterrupted."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Installs the handlers for the duration of a `with` block (main thread only: Python
    delivers signals there, and only there can handlers be set)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._holding = False
        # Under torchrun a rank never stops on its own, only in check(), which all ranks reach
        # after the same step: a rank raising between steps while another held the signal would
        # leave that one waiting in the next all-reduce.
        self._only_at_check = distributed.world_size() > 1
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                # An ignored signal stays ignored (a shell starts background jobs with SIGINT
                # ignored: `zoo train ... &` in a script must survive Ctrl-C on the script).
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # already stopping
        self.signum = signum
        if not self._holding and not self._only_at_check:
            raise StopRequested(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A signal arriving inside this block waits for its end (see check)."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def act_alone(self) -> None:
        """From here each rank works alone (rank 0's final evaluation): stop at once again,
        first on a signal that arrived since the last check."""
        self._only_at_check = False
        if self.signum is not None:
            raise StopRequested(self.signum)

    def check(self, device: torch.device) -> None:
        """After a step: stop if any rank was asked to (a collective under torchrun: every rank calls it)."""
        asked = distributed.max_across_ranks(self.signum or 0, device)
        if asked:
            self.signum = self.signum or asked
            raise StopRequested(asked)
