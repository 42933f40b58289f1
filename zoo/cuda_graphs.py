"""Work captured in a CUDA graph: warmed up on a side stream, then captured, the device's RNG kept.

Used by the captured training step (zoo.training.step_graph) and the captured JVP
(zoo.losses.jvp.CudaGraphJvp).  A graph replays the kernels its capture recorded, reading and
writing the same memory each time: the callers copy fresh inputs into static tensors before a replay.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


def warm_up(run: Callable[[], object], device: torch.device, times: int) -> None:
    """Run `times` times on a side stream before capturing: lazy initialisation, cuDNN autotuning and
    cuBLAS workspaces must happen outside the capture."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(times):
            run()
    torch.cuda.current_stream(device).wait_stream(side)


def capture(run: Callable[[], T], pool: tuple | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """`run` captured in a new graph (allocating from `pool` if given) and what it returned: the
    tensors each replay rewrites."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's CUDA calls are checked during the capture.  The data loader's
    # pin-memory thread keeps allocating pinned memory and querying events meanwhile, which the
    # default ("global") mode would count as an error.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph, output


@contextmanager
def device_rng_kept(device: torch.device) -> Iterator[None]:
    """Warm-up and capture draw dropout masks from the device's generator: put it back afterwards,
    so a resumed run, which captures again, stays on the uninterrupted run's random stream."""
    state = torch.cuda.get_rng_state(device)
    try:
        yield
    finally:
        torch.cuda.set_rng_state(state, device)
