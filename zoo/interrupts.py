"""SIGINT (Ctrl-C), SIGTERM (`timeout`, schedulers, the remote supervisor) and SIGHUP (a closed
terminal or ssh session) as a request to stop.

A signal that arrives during a training step (or while a checkpoint is being written) is held
until the step is complete, so the run can stop on a checkpoint of a whole step; at any other
time (the memory probe, evaluation) a single process stops at once: those never change the training
state.  Under torchrun a rank never stops on its own while the ranks work together: they ask each
other once before the run folder is written and after each step, so all of them stop at the same
point (a rank that stopped alone would leave the others waiting in the next all-reduce); after the
loop, where rank 0 alone evaluates, it stops at once again (act_alone).

Further signals while stopping are ignored, so that a second Ctrl-C, or torchrun passing the
terminal's signal on to its processes, cannot cut the final checkpoint short; SIGKILL still ends
the process at once.

A held signal is not silent: a step can take seconds.  The handler only records it; the training
bar (zoo.training.progress), redrawn by rich's own thread, shows notice().  Without a live bar
(a log file, a pipe) rank 0 writes one plain line per signal instead; other ranks say nothing.
"""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import torch

from zoo import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# What a signal outside held() means under torchrun, where a rank stops only at the ranks' next
# check together (after the step in progress, or before the run folder is written).
UNHELD_RANK_NOTICE = (
    "stopping once every rank reaches the next check (after a step: saving a checkpoint of it)"
)


def signal_display_name(signum: int) -> str:
    """How a user knows the signal: SIGINT is the Ctrl-C they typed."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def ignored_notice(signum: int) -> str:
    """Said for each signal after the first: why it is ignored, and what does stop at once.

    Not "losing only the step in progress": the checkpoint being written is this step's, and the
    one on disk may be save_every steps older."""
    return (
        f"{signal_display_name(signum)} again: ignored, so the checkpoint is written whole; "
        f"`kill -9 {os.getpid()}` stops at once, "
        "losing the steps since the last checkpoint on disk (written atomically, it stays intact)"
    )


def write_from_handler(line: str) -> None:
    """One line to stderr from a signal handler."""
    # os.write, not print: sys.stderr's buffer refuses a write that interrupted its own.
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:
        # Nobody is reading (`zoo train ... 2>&1 | tee log` whose tee the same Ctrl-C ended:
        # EPIPE): the notice is lost; the stop, and the checkpoint it saves, must not be.
        pass


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
        self._on_held = ""  # what held() says happens to a signal it holds
        self._notice: str | None = None  # what happens to the signal received, once it is held
        self._ignored: int | None = None  # the last signal ignored while stopping
        # The ranks' lines would repeat rank 0's.
        self._speaks = distributed.is_main()
        # Set while a live progress bar shows notice(): a line written from the handler, which may
        # have interrupted a render in this thread, would tear the bar.
        self.shown_live = False
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
        # Only records and, without a live bar, writes a line: it runs between two bytecodes of
        # whatever the main thread was doing, a rich render included.
        if self.signum is not None:
            self._ignored = signum  # already stopping
            self._tell(ignored_notice(signum))
            return
        self.signum = signum
        if self._holding:
            self._notice = self._on_held
        elif self._only_at_check:
            self._notice = UNHELD_RANK_NOTICE
        else:
            raise StopRequested(signum)  # said by the interrupted run's last line
        self._tell(self._notice)

    def _tell(self, line: str) -> None:
        if self._speaks and not self.shown_live:
            write_from_handler(line)

    def notice(self) -> str | None:
        """What the progress display shows: nothing until a signal is held, then what it waits for
        and, once another signal came, that it was ignored."""
        if self._notice is None:
            return None
        if self._ignored is None:
            return self._notice
        return f"{self._notice}. {ignored_notice(self._ignored)}"

    @contextlib.contextmanager
    def held(self, notice: str) -> Iterator[None]:
        """A signal arriving inside this block waits for its end (see check); `notice` says so."""
        self._holding, self._on_held = True, notice
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
