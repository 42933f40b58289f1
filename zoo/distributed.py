"""Data-parallel training without the DDP wrapper.

MeanFlow's loss takes a forward-mode JVP of the model (torch.func.jvp).  That cannot go through
DistributedDataParallel: DDP's hooks serve reverse mode only, and a JVP through the wrapper
either fails or silently skips gradient synchronisation.  So every
process runs the loss on the plain module, and the trainer synchronises explicitly:

    init()                          once per process, from torchrun's environment
    broadcast_parameters(model)     after building the model: every rank starts from rank 0's weights
    ... loss.backward() ...
    all_reduce_gradients(model)     after backward, before clipping and the optimiser step
    shutdown()

With one process (no torchrun), every function here is a no-op, so the trainer has a single
code path.  Gradients are averaged over ranks; with equal per-rank batches and a loss that is
a per-sample mean, that equals the gradient of the full global batch on one process.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# Gradients are reduced in flat buckets: few large collectives are much faster than one per tensor.
BUCKET_BYTES = 32 * 1024 * 1024
# How long the other ranks wait for rank 0's solo work (evaluation, sample grids, a download):
# far longer than the process group's timeout, which guards the training collectives against hangs.
WAIT_FOR_MAIN_TIMEOUT_S = 6 * 3600.0
_wait_group: dist.ProcessGroup | None = None


class DistributedError(RuntimeError):
    pass


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and prints."""
    return rank() == 0


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init(
    device_type: str | None = None, timeout_s: float = 1800.0, wait_timeout_s: float = WAIT_FOR_MAIN_TIMEOUT_S
) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without torchrun (WORLD_SIZE unset or 1) nothing happens.  `device_type` is the type of the
    run's device ("cuda", "cpu"; default: cuda when available): NCCL for CUDA, gloo otherwise.
    On CUDA each process takes the GPU of its LOCAL_RANK, so `torch.device("cuda")` means that
    GPU from then on.  `timeout_s` bounds every training collective; `wait_timeout_s` bounds
    wait_for_main.
    """
    global _wait_group
    if env_world_size() <= 1 or is_initialized():
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} unset: start multi-process "
            "training with torchrun (zoo train --nproc N does it for you)"
        )
    use_cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        if local_rank() >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank()} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "lower --nproc to the number of GPUs"
            )
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        backend=backend_for("cuda" if use_cuda else "cpu"), timeout=timedelta(seconds=timeout_s)
    )
    # gloo on any device: a barrier needs no GPU memory, and gloo's honours this group's timeout.
    _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s))


def shutdown() -> None:
    global _wait_group
    if is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def wait_for_main() -> None:
    """All ranks meet here after work rank 0 does alone (evaluation, a dataset download).

    Without it the others would wait for rank 0 inside their next gradient all-reduce: under
    the process group's timeout, and at a place whose error does not say what they waited for.
    A no-op for one process.
    """
    if is_initialized():
        dist.barrier(group=_wait_group)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, each group at most ~bucket_bytes."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        current = buckets[-1] if buckets else None
        fits = (
            current is not None
            and current[0].dtype == tensor.dtype
            and current[0].device == tensor.device
            and size + tensor.numel() * tensor.element_size() <= bucket_bytes
        )
        if not fits:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += tensor.numel() * tensor.element_size()
    return buckets


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (a no-op for one process)."""
    if world_size() == 1:
        return
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.numel() > 0]
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        dist.broadcast(flat, src=src)
        for tensor, chunk in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            tensor.copy_(chunk.view_as(tensor))


@torch.no_grad()
def all_reduce_gradients(module: nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average `.grad` over ranks (a no-op for one process).

    A parameter without a gradient on some ranks (e.g. a class embedding no sample of this
    rank's batch used) counts as zero there; one without a gradient on every rank stays None,
    so the optimiser skips it exactly as it would on one process.
    """
    if world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    active = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    scale = 1.0 / world_size()
    for bucket in _buckets([p.grad for p in active], bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.mul_(scale)
        for grad, chunk in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
            grad.copy_(chunk.view_as(grad))


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest `value` any rank holds; `value` itself for one process."""
    if world_size() == 1:
        return value
    packed = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return int(packed.item())


def is_max_metric(key: str) -> bool:
    """A metric named `max_*` is the largest value of the step (over micro-batches and ranks), not
    their mean."""
    return key.startswith("max_")


def reduce_metrics(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """A step's scalar metrics over the whole global batch: the mean over ranks, and for a metric
    named `max_*` the largest any rank saw.  Every rank must call it with the same keys."""
    if world_size() == 1 or not values:
        return dict(values)
    reduced = {}
    for op, keys in (
        (dist.ReduceOp.SUM, sorted(k for k in values if not is_max_metric(k))),
        (dist.ReduceOp.MAX, sorted(k for k in values if is_max_metric(k))),
    ):
        if not keys:
            continue
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(packed, op=op)
        scale = 1.0 / world_size() if op == dist.ReduceOp.SUM else 1.0
        reduced.update({k: float(v) * scale for k, v in zip(keys, packed.tolist(), strict=True)})
    return {k: reduced[k] for k in values}


# Seconds a training process gets, after SIGTERM, to finish its step and save it before SIGKILL.
# The price: when one rank crashes, torchrun gives the survivors the same time, and under NCCL they
# wait for the dead peer in their next all-reduce until it runs out (gloo notices at once).
STOP_GRACE_S = 300
TORCHRUN_DEFAULT_GRACE_S = 30  # what a torchrun without --shutdown_timeout gives


def torchrun_has_shutdown_timeout() -> bool:
    from torch.distributed.run import get_args_parser

    defaults = vars(get_args_parser().parse_args(["script.py"]))
    return "shutdown_timeout" in defaults


def shutdown_grace_s() -> int:
    """Seconds torchrun gives stopping ranks before SIGKILL: zoo's grace where torchrun takes it,
    else torchrun's fixed default."""
    return STOP_GRACE_S if torchrun_has_shutdown_timeout() else TORCHRUN_DEFAULT_GRACE_S


def torchrun_command(
    nproc: int, module: str, args: list[str], failures_file: Path | None = None
) -> list[str]:
    """`python -m torch.distributed.run` with `nproc` processes on this machine running `-m module args`.

    With `failures_file`, through zoo.training.launch, which writes there how each failed rank
    ended (exit code, signal) as JSON.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    # torchrun SIGKILLs its workers this long after passing a SIGINT/SIGTERM on (its default: 30 s);
    # a stopping run first finishes its step and writes a checkpoint, which can take longer.
    launcher = ["torch.distributed.run"]
    if failures_file is not None:
        launcher = ["zoo.training.launch", "--failures-file", str(failures_file)]
    # An older torchrun (a GPU machine's own torch may be one) has no --shutdown_timeout: its
    # fixed 30 s then apply.
    grace = [f"--shutdown_timeout={STOP_GRACE_S}"] if torchrun_has_shutdown_timeout() else []
    return [
        sys.executable,
        "-m",
        *launcher,
        "--standalone",
        f"--nproc_per_node={nproc}",
        *grace,
        "-m",
        module,
        *args,
    ]
