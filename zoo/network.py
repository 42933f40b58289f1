"""Network access that fails instead of hanging: a default socket timeout for libraries that set none."""

import contextlib
import socket
from collections.abc import Iterator


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
