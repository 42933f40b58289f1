"""The workloads `zoo bench-jvp` times, on synthetic data.

A training step here is what the trainer's step costs without data loading: the loss on a fixed
batch, backward, one Adam step, gradients set to None (or, with the step captured in a CUDA
graph as train.cuda_graph runs it, zeroed in place; or compiled as train.compile runs it).  The
data is random (N(0, 1) images, or 2-D points): shapes, not values, decide the cost, and the
benchmark must run where no dataset has been downloaded.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from zoo.config.schema import DataConfig, LossConfig, ModelConfig
from zoo.data.toy2d import TOY_DISTRIBUTIONS
from zoo.devices import autocast_dtype
from zoo.flow import conditional_velocity, interpolate
from zoo.losses import AlphaFlowLoss, Loss, build_loss
from zoo.losses.base import metrics_to_floats
from zoo.losses.jvp import jvp_with_primal
from zoo.losses.time_sampling import sample_t_r
from zoo.models.base import FlowModel
from zoo.training.compiled_step import compile_evaluate, keeps_grads
from zoo.training.step_graph import GraphedLossBackward

# Image datasets' shapes (channels, height, width) and classes, known without their files.
IMAGE_SHAPES: dict[str, tuple[int, int]] = {  # name -> (channels, default size)
    "digits": (1, 8),
    "fashion-mnist": (1, 28),
    "cifar10": (3, 32),
    "celeba": (3, 64),
    "imagenet": (3, 256),
}
IMAGE_CLASSES = {"digits": 10, "fashion-mnist": 10, "cifar10": 10, "celeba": 0, "imagenet": 1000}
LATENT_CHANNELS, LATENT_DOWNSAMPLE = 4, 8  # SD-VAE latents of imagenet-latents


def data_signature(cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    """(data_shape, num_classes) of a dataset config, without loading the dataset."""
    if cfg.name in TOY_DISTRIBUTIONS:
        classes = TOY_DISTRIBUTIONS[cfg.name]().num_components if cfg.class_conditional else 0
        return (2,), classes
    if cfg.name == "imagenet-latents":
        size = (cfg.image_size or 256) // LATENT_DOWNSAMPLE
        return (LATENT_CHANNELS, size, size), 1000 if cfg.class_conditional else 0
    channels, default_size = IMAGE_SHAPES[cfg.name]
    size = cfg.image_size if cfg.name in ("celeba", "imagenet") and cfg.image_size else default_size
    return (channels, size, size), IMAGE_CLASSES[cfg.name] if cfg.class_conditional else 0


@dataclass
class Batch:
    """A fixed synthetic batch and the tensors a bare forward / JVP needs (all r != t)."""

    x: Tensor
    y: Tensor | None
    z: Tensor
    v: Tensor
    t: Tensor
    r: Tensor


def synthetic_batch(
    model: FlowModel, batch_size: int, device: torch.device, loss_cfg: LossConfig, seed: int = 0
) -> Batch:
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch_size, *model.data_shape)
    x = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    y = None
    if model.num_classes:
        y = torch.randint(0, model.num_classes, (batch_size,), generator=generator, device=device)
    times = sample_t_r(batch_size, loss_cfg.model_copy(update={"ratio": 1.0}), generator)
    z = interpolate(x, noise, times.t)
    return Batch(x=x, y=y, z=z, v=conditional_velocity(x, noise), t=times.t, r=times.r)


@contextlib.contextmanager
def precision_context(device: torch.device, precision: str) -> Iterator[None]:
    """The run's autocast (as the trainer's micro_batch_backward): nothing for fp32."""
    dtype = autocast_dtype(precision)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        yield


def forward_fn(model: FlowModel, batch: Batch, precision: str) -> Callable[[], None]:
    """A no-grad forward of the whole batch."""

    def run() -> None:
        with torch.no_grad(), precision_context(batch.x.device, precision):
            model(batch.z, batch.t, batch.r, batch.y)

    return run


def jvp_fn(model: FlowModel, batch: Batch, precision: str, jvp_precision: str) -> Callable[[], None]:
    """A no-grad JVP (primal and tangent) of the whole batch, every sample with r != t."""

    def run() -> None:
        with torch.no_grad(), precision_context(batch.x.device, precision):
            jvp_with_primal(model, batch.z, batch.t, batch.r, batch.y, batch.v, jvp_precision)

    return run


def training_step_fn(
    model: FlowModel,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    batch: Batch,
    precision: str,
    seed: int = 0,
) -> Callable[[], None]:
    """Loss + backward + Adam step on the fixed batch; its own generator, so interleaving with
    other cases does not change what it draws."""
    generator = torch.Generator(device=batch.x.device).manual_seed(seed)

    def run() -> None:
        with precision_context(batch.x.device, precision):
            out = loss_fn(model, batch.x, batch.y, generator)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def graphed_training_step_fn(
    model: FlowModel,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    batch: Batch,
    precision: str,
    seed: int = 0,
    pool: tuple | None = None,
) -> Callable[[], None]:
    """training_step_fn with loss + backward replayed from a CUDA graph, as the trainer runs it
    under train.cuda_graph: eager draws, replay, metrics to the host, Adam, gradients zeroed in place."""
    generator = torch.Generator(device=batch.x.device).manual_seed(seed)
    graphed = GraphedLossBackward(loss_fn, autocast_dtype(precision), pool=pool)

    def run() -> None:
        draws = loss_fn.draw(model, batch.x, batch.y, generator)
        metrics_to_floats(graphed(model, batch.x, draws))
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return run


def compiled_training_step_fn(
    model: FlowModel,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    batch: Batch,
    precision: str,
    compile_mode: str = "default",
    seed: int = 0,
) -> Callable[[], None]:
    """training_step_fn with loss + backward compiled, as the trainer runs it under train.compile:
    eager draws, the compiled loss (zoo.training.compiled_step) and its backward, Adam.  The
    first call compiles."""
    generator = torch.Generator(device=batch.x.device).manual_seed(seed)
    evaluate = compile_evaluate(loss_fn, compile_mode)

    def run() -> None:
        draws = loss_fn.draw(model, batch.x, batch.y, generator)
        with precision_context(batch.x.device, precision):
            loss, metrics = evaluate(model, batch.x, draws)
        loss.backward()
        metrics_to_floats(metrics)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not keeps_grads(compile_mode))  # as the trainer does

    return run


def meanflow_loss(base: LossConfig, mode: str, ratio: float) -> Loss:
    return build_loss(base.model_copy(update={"kind": "meanflow", "jvp": mode, "ratio": ratio}))


def flow_matching_loss(base: LossConfig) -> Loss:
    return build_loss(base.model_copy(update={"kind": "flow_matching"}))


# The second-generation objectives `zoo bench-jvp --objectives` times against the FM step:
# name -> (loss.kind, the model's v-head and guidance inputs, class-conditional).
OBJECTIVES: dict[str, tuple[str, bool, bool]] = {
    "imf": ("imf", True, False),
    "imf_cond": ("imf", True, True),
    "alphaflow": ("alphaflow", False, False),
}
BENCH_CLASSES = 10  # classes of the class-conditional iMF case when the preset has none


def objective_model_config(model_cfg: ModelConfig, objective: str) -> ModelConfig:
    """The preset's network as the objective trains it: with a v-head (at least one block) and,
    class-conditionally, guidance inputs."""
    _, v_head, conditional = OBJECTIVES[objective]
    if not v_head:
        return model_cfg
    return model_cfg.model_copy(update={"v_head": max(model_cfg.v_head, 1), "guidance_inputs": conditional})


def objective_loss(base: LossConfig, objective: str, ratio: float) -> Loss:
    """The objective's loss at `ratio`; alpha-Flow mid-curriculum (alpha = 1/2: its no-JVP step)."""
    kind = OBJECTIVES[objective][0]
    loss = build_loss(base.model_copy(update={"kind": kind, "jvp": "fused", "ratio": ratio}))
    if isinstance(loss, AlphaFlowLoss):
        loss.alpha = 0.5
    return loss
