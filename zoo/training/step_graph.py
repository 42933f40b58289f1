"""A micro-batch's loss and backward replayed from one CUDA graph (`train.cuda_graph = true`).

Why: on a GPU, a step of a model the size of the paper's CIFAR-10 U-Net is bound by the host
issuing kernels, not by the GPU (EXPERIMENT_LOG.md, "First GPU measurements": a step launches
thousands of kernels, and the GPU idles between them).  Replaying them
from a graph costs the host one launch, so a step takes what its kernels take.

What the graph holds: `loss.evaluate` on the micro-batch and its draws, under the run's
autocast, and backward, which accumulates into every parameter's `.grad` in place.  What stays
eager: data loading, `loss.draw` (the run's generator gives the same stream as without the
graph), gradient all-reduce, clipping, the optimiser and EMA.

Rules that keep replays right (checked, not assumed: a change triggers a new capture):
- Inputs are copied into static buffers; the graph reads parameters where they live, so
  in-place optimiser updates are seen by the next replay.  A replaced parameter or buffer
  (`.to()`, `p.data = ...`), a new model, train/eval mode, or other input shapes or dtypes
  mean a new capture.
- Gradients are static tensors the graph adds into; zero them in place between steps
  (`zero_grad(set_to_none=False)`).  A gradient set to None or replaced in between is put back
  into the static tensor before the next replay (None as zeros), so eager code may touch them.
  Parameters the loss never reaches keep `.grad = None`, as in eager training.
- Dropout draws from the device's default generator, whose graph-safe offsets advance per replay.
- Not inside: fp16 loss scaling (GradScaler changes its scale on the host), a JVP mode that
  itself captures a graph (`cuda_graph`, graphs do not nest) or compiles (`compile`): the rules
  are zoo.training.jvp_plan.check_capture's.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from zoo import cuda_graphs
from zoo.losses.base import Draws, Loss, flat_tensors, map_tensors
from zoo.models.base import FlowModel


@contextmanager
def run_autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    # cache_enabled=False: autocast's cache of bf16 weight copies must not outlive one capture,
    # or replays would read copies of the weights from before the optimiser's update.
    with torch.autocast(
        device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
    ):
        yield


class GraphedLossBackward:
    """loss.evaluate + backward of one micro-batch, captured once and replayed every call."""

    def __init__(
        self, loss_fn: Loss, autocast_dtype: torch.dtype | None, warmup: int = 3, pool: tuple | None = None
    ) -> None:
        """pool: a torch.cuda.graph_pool_handle() shared with other graphs that are never replayed
        concurrently (the benchmark's cases), so their activations share one memory pool."""
        self.loss_fn = loss_fn
        self.pool = pool
        self.autocast_dtype = autocast_dtype
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.inputs: tuple[Tensor, Draws] | None = None
        self.outputs: dict[str, Tensor] = {}
        self.grads: dict[int, Tensor] = {}  # id(parameter) -> the static gradient the graph adds into
        self.captures = 0

    def graph_key(self, model: FlowModel, x: Tensor, draws: Draws, divisor: int) -> tuple:
        inputs = tuple((tuple(t.shape), t.dtype) for t in flat_tensors((x, draws)))
        structure = map_tensors(draws, lambda t: None)  # which fields are None (e.g. labels)
        storage = tuple(p.data_ptr() for p in model.parameters()) + tuple(
            b.data_ptr() for b in model.buffers()
        )
        return (id(model), model.training, x.device, inputs, repr(structure), divisor, storage)

    def attach_gradients(self, model: FlowModel) -> None:
        """Make every reached parameter's `.grad` the static tensor the graph adds into, keeping
        its value (None counts as zero)."""
        to_zero: list[Tensor] = []
        for p in model.parameters():
            static = self.grads.get(id(p))
            if static is None or p.grad is static:
                continue
            if p.grad is None:
                to_zero.append(static)
            else:
                static.copy_(p.grad)
            p.grad = static
        if to_zero:
            torch._foreach_zero_(to_zero)

    def __call__(self, model: FlowModel, x: Tensor, draws: Draws, divisor: int = 1) -> dict[str, Tensor]:
        """Add d(loss)/d(parameters) / divisor into `.grad` (divisor: micro-batches per step);
        return the loss's metrics (fresh tensors, safe to keep across replays)."""
        key = self.graph_key(model, x, draws, divisor)
        if key != self.key:
            self.capture(model, x, draws, divisor)
            self.key = key  # only once the capture succeeded
        self.attach_gradients(model)
        static_x, static_draws = self.inputs
        for static, fresh in zip(
            flat_tensors((static_x, static_draws)), flat_tensors((x, draws)), strict=True
        ):
            static.copy_(fresh)
        self.graph.replay()
        return {name: value.clone() for name, value in self.outputs.items()}

    def run(self, model: FlowModel, x: Tensor, draws: Draws, divisor: int) -> dict[str, Tensor]:
        with run_autocast(x.device, self.autocast_dtype):
            loss, metrics = self.loss_fn.evaluate(model, x, draws)
        (loss / divisor).backward()
        return metrics

    def capture(self, model: FlowModel, x: Tensor, draws: Draws, divisor: int) -> None:
        self.graph, self.key = None, None  # release the previous graph's pool; no stale key if this fails
        params = list(model.parameters())
        # Gradients accumulated so far this step (a recapture mid-step) are set aside and put back
        # (attach_gradients copies them into the static tensors): warm-up and capture must not
        # change what the step's gradients will be, even when they fail.
        pending = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            with cuda_graphs.device_rng_kept(x.device):
                self._warm_up_and_capture(model, params, x, draws, divisor)
        finally:
            for p, grad in zip(params, pending, strict=True):
                p.grad = grad

    def _warm_up_and_capture(
        self, model: FlowModel, params: list[Tensor], x: Tensor, draws: Draws, divisor: int
    ) -> None:
        self.inputs = map_tensors((x, draws), lambda t: t.clone())
        static_x, static_draws = self.inputs

        def run() -> dict[str, Tensor]:
            return self.run(model, static_x, static_draws, divisor)

        # The warm-up also tells which parameters the loss reaches.
        cuda_graphs.warm_up(run, x.device, self.warmup)
        reached = [p for p in params if p.grad is not None]
        for p in params:
            p.grad = None
        for p in reached:
            p.grad = torch.zeros_like(p)
        self.grads = {id(p): p.grad for p in reached}
        # The graph allocates from its own pool: hand the blocks the warm-up (and the memory
        # probe before it) left cached back to the device, or the step's memory is held twice.
        torch.cuda.empty_cache()
        self.graph, self.outputs = cuda_graphs.capture(run, self.pool)
        self.captures += 1
