"""`train.compile = true`: each micro-batch's loss and backward compiled by torch.compile.

What is compiled: `loss.evaluate` — the model's forward, MeanFlow's fused tangent and the loss.
AOTAutograd derives the backward from it, so a micro-batch shape gets one forward graph and one
backward graph, in which inductor fuses the element-wise chains (norms, activations, casts and
the fused mode's tangent arithmetic: the many small operations of a U-Net step,
EXPERIMENT_LOG.md) into few kernels.  Data, `loss.draw` (the run's generator: the same stream as
without compiling), gradient all-reduce, the optimiser and EMA stay eager, and the model is
not wrapped, so checkpoints are those of an eager run.  Randomness inside the model (dropout)
comes from inductor's own generator, not the eager one: a run with dropout > 0 is reproducible
compiled, but draws other masks than the same run eager (and than before a resume that toggles
train.compile).

MeanFlow compiles with the fused JVP only (zoo.training.jvp_plan.COMPILABLE).  The other modes call
torch.func.jvp, which torch.compile cannot trace inside a training step: it refuses zoo's custom-jvp layers
and `detached_tangents`' context variable, and its fallback hits an internal assert
(`_make_dual`).  The fused mode's tangent is ordinary tensor code and compiles into the same
graph as the forward; while compiling, zoo's layers run their native operations
(zoo.models.layers, `torch.compiler.is_compiling()`), whose derivatives autograd knows.

Cost: the first step of each micro-batch shape compiles (tens of seconds for small models,
minutes for the paper's U-Net on a CPU); on CUDA the memory probe compiles each micro-batch size
it tries.  A shape beyond RECOMPILE_LIMIT is an error, not torch's silent fall-back to eager.

Modes with CUDA graphs ("reduce-overhead", "max-autotune") replace train.cuda_graph, which
refuses to run with compile.  Their backward's outputs live in the graphs' memory pool, which the
next replay overwrites: `.grad` must then be buffers of its own (allocated before the first
compiled call, zeroed in place after each step: `keeps_grads`), into which each micro-batch's
gradient is added — otherwise `.grad` would be the pool's tensor and a second micro-batch
(grad_accum, or a batch the memory probe split) would overwrite the first one's gradient.
"""

from collections.abc import Callable
from typing import get_args

import torch
from torch import Tensor

from zoo.config.loading import ConfigError
from zoo.config.schema import CompileMode
from zoo.errors import CompileError
from zoo.losses.base import Draws, Loss
from zoo.models.base import FlowModel

COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
USES_CUDA_GRAPHS = ("reduce-overhead", "max-autotune")
# Graphs kept per compiled function (one per micro-batch shape and loss settings; a benchmark
# sweeping ratios compiles one per ratio).  torch's default (8) would make the ninth shape run
# eagerly without a word, so a step, or a benchmark case labelled compiled, would not be.
RECOMPILE_LIMIT = 64

Evaluate = Callable[[FlowModel, Tensor, Draws], tuple[Tensor, dict[str, Tensor]]]


def keeps_grads(mode: str) -> bool:
    """Whether `.grad` must stay allocated between steps (zero_grad(set_to_none=False)): under
    the modes with CUDA graphs (see the module doc; off CUDA they replay none, and keeping the
    buffers costs an in-place zero)."""
    return mode in USES_CUDA_GRAPHS


def allocate_grads(model: torch.nn.Module) -> None:
    """Give every trainable parameter without one a zeroed `.grad` of its own, outside any graph.

    Unlike eager training, a parameter the loss never reaches then has a zero gradient rather
    than None, which AdamW's weight decay would still apply to; every parameter of zoo's
    networks gets a gradient from both losses, so no run differs today."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def compile_evaluate(loss_fn: Loss, mode: str) -> Evaluate:
    """`loss_fn.evaluate`, compiled; static shapes (each micro-batch shape compiles once).

    Under modes with CUDA graphs each call gives the parameters gradient buffers of their own
    (see the module doc), starts a new graph step and hands back metrics the next replay cannot
    overwrite (the trainer keeps them across micro-batches).
    """
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown train.compile_mode {mode!r}; use one of {COMPILE_MODES}")
    # fullgraph=False: a graph break (a model zoo's layers do not cover) costs speed, not the run;
    # zoo's own networks trace without one (tests/test_training_compiled_step.py explains them).
    compiled = torch.compile(loss_fn.evaluate, mode=mode, dynamic=False)
    # Patched per call: recompiles happen inside the call that meets a new shape.
    limits = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)

    def run_compiled(model: FlowModel, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor]]:
        try:
            with limits:
                return compiled(model, x, draws)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise CompileError(
                f"train.compile: {RECOMPILE_LIMIT} micro-batch shapes or loss settings have already "
                f"compiled this loss (now batch {tuple(x.shape)}), and torch.compile would run the next "
                "one eagerly; keep the micro-batch size fixed (train.batch_size, train.grad_accum, "
                "train.auto_microbatch), or set train.compile=false"
            ) from None

    if not keeps_grads(mode):
        return run_compiled

    def evaluate(model: FlowModel, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor]]:
        allocate_grads(model)
        torch.compiler.cudagraph_mark_step_begin()
        loss, metrics = run_compiled(model, x, draws)
        return loss, {name: value.clone() for name, value in metrics.items()}

    return evaluate
