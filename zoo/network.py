"""Network access that fails instead of hanging: a default socket timeout for libraries that set none."""

import contextlib
import http.client
import socket
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """A default timeout for sockets opened inside (torchvision's and clean-fid's downloads pass
    none, so a silent network would stall them for good).  Process-wide while it lasts."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def guarded_download(
    absent: list[Path], timeout_s: float, error: type[Exception], message: Callable[[object], str]
) -> Iterator[None]:
    """Downloads inside get a socket timeout; if they fail, the files of `absent` (missing before)
    are removed, so that no cut-off file is taken for a whole one later, and a network failure
    (URLError, timeouts, resets, cut-off bodies) becomes `error(message(reason))`."""
    try:
        with socket_timeout(timeout_s):
            yield
    except BaseException as failure:  # Ctrl-C cuts a download off as surely as the network does
        for path in absent:
            path.unlink(missing_ok=True)
        if not isinstance(failure, (OSError, http.client.HTTPException)):
            raise
        reason = (
            failure.reason
            if isinstance(failure, urllib.error.URLError)
            else f"{type(failure).__name__}: {failure}"
        )
        raise error(message(reason)) from failure
