"""Several CPU (gloo) processes on this machine, as torchrun would start them, for DDP tests."""

import os
import socket
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from zoo import distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join(rank: int, world: int, port: int, timeout_s: float = 1800.0) -> None:
    """In a child process: torchrun's environment for `rank`, one thread, then distributed.init."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    distributed.init(device_type="cpu", timeout_s=timeout_s)


def run_ranks(main: Callable[..., None], world: int, *args) -> None:
    """`main(rank, world, port, *args)` in `world` processes; raises if any of them fails.

    fork: the children share the already imported torch (spawn would import it again in each).
    """
    mp.start_processes(main, args=(world, free_port(), *args), nprocs=world, join=True, start_method="fork")
