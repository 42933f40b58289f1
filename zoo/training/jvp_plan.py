"""How a run computes MeanFlow's JVP, and every rule about which settings run together.

Five settings decide it: `loss.jvp` (the mode), `loss.jvp_precision` (the island the JVP runs in),
`loss.jvp_kernels` (how the fused mode computes group-norm tangents), `train.cuda_graph` (each
micro-batch's loss + backward replayed from a CUDA graph) and `train.compile` (the same compiled by
torch.compile).  Not every combination runs.  This module holds each rule once, as data or as one
function whose refusal says what is wrong and how to fix it; the trainer asks `plan_run` and
`zoo bench-jvp` asks the same rules about the cases it times.  Its torch-free front is
zoo.config.loading's `check_new_run_jvp` with the schema's TRAINING_JVP_MODES: they refuse the
benchmark's modes for a new run before torch loads (`zoo modal submit`).

Modes (zoo.losses.jvp has the algorithms and their cost in forward passes):
- `fused`, the default: one forward over the whole batch, exactly flow matching's, also carries the
  tangent of the r != t rows.  The fastest eager step on a CPU U-Net, and the fastest step measured
  once steps are captured (train.cuda_graph) or compiled (train.compile), as a GPU should run them
  (EXPERIMENT_LOG.md); no more memory than a flow-matching step; the one mode torch.compile can
  trace.  Under bf16/fp16 autocast its tangent is taken at the reduced-precision activations:
  bf16-size error in du/dt, like the prediction's own.
- `nograd`, the reference: a no-grad JVP of the whole batch, then a separate forward.  Simplest and
  obviously right, and its JVP runs wholly in the loss.jvp_precision island whatever the autocast.
- `auto`: fused (every zoo network computes row tangents).
- BENCH_MODES: the benchmark's alternatives.  `zoo bench-jvp --modes` times them; `zoo train`
  refuses them for a new run, naming fused and nograd.  A resumed run keeps the mode its checkpoint
  records, whichever it is: modes draw dropout masks differently, so switching would change the run.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from zoo.config.loading import ConfigError, check_new_run_jvp
from zoo.config.schema import TRAINING_JVP_MODES, ZooConfigBody
from zoo.losses.jvp import JVP_MODES
from zoo.models import group_norm_tangent_kernel

TRAINING_MODES = TRAINING_JVP_MODES
BENCH_MODES = tuple(m for m in JVP_MODES if m not in TRAINING_MODES)
DEFAULT_MODE = "fused"  # what loss.jvp=auto runs
# Modes that capture or compile the JVP themselves: a captured step cannot contain them (graphs do not
# nest, and a capture cannot hold a compiled region).
NOT_CAPTURABLE = ("cuda_graph", "compile")
# The one mode a compiled step can trace: the others call torch.func.jvp, which torch.compile refuses
# inside a training step (zoo.training.compiled_step).
COMPILABLE = ("fused",)
CUDA_ONLY = ("cuda_graph",)


@dataclass(frozen=True)
class Switch:
    """An on/off setting as its caller names it: a config key for `zoo train`, a flag for the bench."""

    name: str
    off: str  # how to turn it off


CUDA_GRAPH = Switch("train.cuda_graph", "set train.cuda_graph=false")
COMPILE = Switch("train.compile", "set train.compile=false")


def concrete(mode: str) -> str:
    return DEFAULT_MODE if mode == "auto" else mode


def runnable_modes(device: torch.device) -> tuple[str, ...]:
    """Every JVP mode that can run on `device`."""
    return tuple(m for m in JVP_MODES if device.type == "cuda" or m not in CUDA_ONLY)


def decide_mode(cfg: ZooConfigBody, kept_mode: str | None = None) -> tuple[str, str]:
    """(the concrete JVP mode, why) for a run; kept_mode: the mode a resumed run started with."""
    if kept_mode is not None:
        return concrete(kept_mode), "kept from the checkpoint (a resumed run keeps its JVP mode)"
    mode = cfg.loss.jvp
    if not cfg.loss.average_velocity:
        return concrete(mode), "flow matching computes no JVP; the setting is unused"
    check_new_run_jvp(cfg)
    if mode == "auto":
        return DEFAULT_MODE, "loss.jvp=auto: fused"
    if mode == DEFAULT_MODE:
        return mode, "loss.jvp's default"
    return mode, "set by loss.jvp"


# Objectives whose steps are eager only: alpha-Flow switches between two step shapes during training
# (no JVP, then MeanFlow's), and iMF's extra velocity pass has not been captured or compiled.
EAGER_ONLY_LOSSES = ("imf", "alphaflow")
# The JVP modes iMF computes its JVP with (its tangent rows come from the model's own velocity head).
IMF_MODES = ("fused", "nograd")


def check_objective_steps(cfg: ZooConfigBody, mode: str) -> None:
    """iMF and alpha-Flow: eager steps, and for iMF one of its own JVP modes."""
    kind = cfg.loss.kind
    if kind not in EAGER_ONLY_LOSSES:
        return
    for switch in (CUDA_GRAPH, COMPILE):
        if getattr(cfg.train, switch.name.split(".")[1]):
            raise ConfigError(
                f"loss.kind={kind} takes eager steps; {switch.name} captures flow-matching and MeanFlow "
                f"steps only: {switch.off}"
            )
    if kind == "imf" and mode not in IMF_MODES:
        raise ConfigError(f"loss.kind=imf computes its JVP with loss.jvp=fused or nograd, not {mode!r}")


def check_mode_device(mode: str, device: torch.device, resumed: bool = False) -> None:
    if mode not in CUDA_ONLY or device.type == "cuda":
        return
    if resumed:
        # A resumed run keeps its JVP mode (check_resume_config): changing loss.jvp is no fix.
        raise ConfigError(
            f"this run trains with loss.jvp={mode!r} (chosen when it started), which needs a CUDA device, "
            f"but it would resume on {device}; resume it on a CUDA device"
        )
    raise ConfigError(
        f"loss.jvp={mode!r} needs a CUDA device, but this run uses {device}; "
        "use loss.jvp=fused, or a CUDA device"
    )


def check_tangent_kernels(cfg: ZooConfigBody, device: torch.device, mode: str) -> None:
    """loss.jvp_kernels=triton: the fused mode's, on a device where the kernels run."""
    if not cfg.loss.average_velocity or cfg.loss.jvp_kernels != "triton":
        return
    if mode != "fused":
        raise ConfigError(
            f"loss.jvp_kernels=triton changes how loss.jvp=fused computes tangents, and this run uses "
            f"loss.jvp={mode}: drop loss.jvp_kernels=triton or use loss.jvp=fused"
        )
    if message := group_norm_tangent_kernel.refusal(device):
        raise ConfigError(message)


def check_capture(
    device: torch.device, precision: str, mode: str | None, resumed: bool = False, switch: Switch = CUDA_GRAPH
) -> None:
    """A step replayed from a CUDA graph: CUDA, no loss scaling, a JVP mode that captures nothing
    itself (mode None: flow matching, which computes no JVP)."""
    if device.type != "cuda":
        raise ConfigError(f"{switch.name} needs a CUDA device, but this run uses {device}; {switch.off}")
    if precision == "fp16":
        raise ConfigError(
            f"{switch.name} does not run with precision=fp16 (its loss scaler changes the scale on the "
            "host between steps); use precision=bf16, which needs no scaling"
        )
    if mode not in NOT_CAPTURABLE:
        return
    if resumed:
        # A resumed run keeps its JVP mode (check_resume_config): changing loss.jvp is no fix.
        raise ConfigError(
            f"this run trains with loss.jvp={mode!r} (chosen when it started), which cannot run inside "
            f"{switch.name}'s captured step; resume it without {switch.name}"
        )
    raise ConfigError(
        f"loss.jvp={mode!r} cannot run inside {switch.name}'s captured step (a graph cannot contain "
        "another capture or a compiled region); use loss.jvp=fused or nograd with it"
    )


def check_compile(
    device: torch.device,
    loss_kind: str,
    mode: str,
    jvp_precision: str,
    resumed: bool = False,
    switch: Switch = COMPILE,
) -> None:
    """A compiled step: MeanFlow with the one traceable mode, in the precision it can hold."""
    if loss_kind != "meanflow":
        return
    if concrete(mode) not in COMPILABLE:
        if resumed:
            raise ConfigError(
                f"this run trains with loss.jvp={mode!r} (chosen when it started), which torch.compile "
                f"cannot trace (it runs torch.func.jvp); resume it without {switch.name}"
            )
        raise ConfigError(
            f"{switch.name} compiles MeanFlow with loss.jvp=fused only; loss.jvp={mode!r} runs "
            "torch.func.jvp, which torch.compile cannot trace in a training step. Use loss.jvp=fused, "
            f"or {switch.off}"
        )
    if device.type == "cuda" and jvp_precision == "fp32":
        # Inside a compiled graph the matmul precision cannot be switched for the JVP alone: it follows
        # the process-wide flags, TF32 in zoo's training and benchmarks.
        raise ConfigError(
            f"under {switch.name} the JVP cannot switch matmul precision inside the compiled step and "
            "follows the run's (TF32 on CUDA), so loss.jvp_precision=fp32 (IEEE) cannot hold; use "
            f"loss.jvp_precision=tf32 or bf16, or {switch.off}"
        )


def faster_steps(cfg: ZooConfigBody, device: torch.device, mode: str, resumed: bool) -> list[str]:
    """For a CUDA run with eager steps, the options that would capture or compile them and that its
    own rules accept.  Eager steps of mid-size models are bound by the host launching kernels."""
    if device.type != "cuda" or cfg.train.cuda_graph or cfg.train.compile:
        return []
    offers = []
    if accepts(check_capture, device, cfg.precision, meanflow_mode(cfg, mode), resumed):
        offers.append("train.cuda_graph=true")
    if accepts(check_compile, device, cfg.loss.kind, mode, cfg.loss.jvp_precision, resumed):
        offers.append("train.compile=true")
    return offers


def accepts(check: Callable[..., None], *args: Any) -> bool:
    try:
        check(*args)
    except ConfigError:
        return False
    return True


def meanflow_mode(cfg: ZooConfigBody, mode: str) -> str | None:
    """The JVP mode a step runs: None for flow matching, which computes no JVP."""
    return mode if cfg.loss.average_velocity else None


def faster_step_tip(cfg: ZooConfigBody, device: torch.device, mode: str, resumed: bool) -> str | None:
    """The faster_steps a CUDA run could take, with the benchmark that times them on its GPU."""
    offers = faster_steps(cfg, device, mode, resumed)
    if not offers:
        return None
    flags = " ".join(("--cuda-graph" if "cuda_graph" in o else "--compile") for o in offers)
    # The benchmark times fp32 and bf16 autocast; bf16 runs at fp16's tensor-core rate without the
    # loss scaler, the nearest it can time to an fp16 step.
    precision = "bf16" if cfg.precision == "fp16" else cfg.precision
    return (
        f"tip: this CUDA run takes eager steps; {' or '.join(offers)} may be faster: time them on this GPU "
        f"with `zoo bench-jvp --model {cfg.preset or 'PRESET'} --device cuda --precision {precision} "
        f"--batch-size {cfg.train.batch_size} --ratios {cfg.loss.ratio:g} --modes {mode} {flags}`"
    )


def fused_precision_note(precision: str, jvp_precision: str) -> str | None:
    """What autocast does to the fused mode's tangent, when it is not what loss.jvp_precision says."""
    if precision == "fp32" or jvp_precision == "bf16":
        return None
    return (
        f"under {precision} its tangent is taken at {precision} activations; loss.jvp=nograd computes "
        f"the whole JVP in loss.jvp_precision={jvp_precision}"
    )


def group_norm_tangents(
    model: torch.nn.Module, device: torch.device, jvp_kernels: str, compiled: bool
) -> str | None:
    """How a fused step computes `model`'s group-norm tangents (loss.jvp_kernels); None without any."""
    if not group_norm_tangent_kernel.has_group_norms(model):
        return None
    if compiled:
        return "PyTorch operations, fused by inductor"
    if group_norm_tangent_kernel.resolve(jvp_kernels, device) == "triton":
        return "Triton kernels (loss.jvp_kernels)"
    failed = group_norm_tangent_kernel.failed_first_launch(device)
    return "PyTorch operations (loss.jvp_kernels" + (
        f"; the Triton kernels failed: {failed})" if failed else ")"
    )


@dataclass(frozen=True)
class JvpPlan:
    """What a run's steps do about the JVP: its mode, and whether they are captured or compiled."""

    mode: str  # concrete; flow matching keeps its (unused) setting's
    reason: str  # why this mode, with what autocast does to it
    meanflow: bool
    cuda_graph: bool
    compile: bool
    compile_mode: str
    jvp_kernels: str
    tip: str | None  # the faster steps a CUDA run with eager steps would accept

    def describe(self, model: torch.nn.Module, device: torch.device) -> str:
        """Why this mode, and how a fused step computes its group-norm tangents."""
        tangents = None
        if self.mode == "fused":
            tangents = group_norm_tangents(model, device, self.jvp_kernels, self.compile)
        return self.reason + (f"; group-norm tangents: {tangents}" if tangents else "")


def plan_run(cfg: ZooConfigBody, device: torch.device, kept_mode: str | None = None) -> JvpPlan:
    """The JVP plan of a run on `device`, or a ConfigError naming the fix for settings that cannot run.

    kept_mode: a resumed run's mode (its checkpoint's; before the checkpoint is read, its config's
    loss.jvp, which a resumed run cannot change).
    """
    mode, reason = decide_mode(cfg, kept_mode)
    resumed = kept_mode is not None
    check_mode_device(mode, device, resumed)
    check_objective_steps(cfg, mode)
    check_tangent_kernels(cfg, device, mode)
    if cfg.train.cuda_graph:
        check_capture(device, cfg.precision, meanflow_mode(cfg, mode), resumed)
    if cfg.train.compile:
        check_compile(device, cfg.loss.kind, mode, cfg.loss.jvp_precision, resumed)
    if mode == "fused" and (note := fused_precision_note(cfg.precision, cfg.loss.jvp_precision)):
        reason += f"; {note}"
    return JvpPlan(
        mode=mode,
        reason=reason,
        meanflow=cfg.loss.average_velocity,
        cuda_graph=cfg.train.cuda_graph,
        compile=cfg.train.compile,
        compile_mode=cfg.train.compile_mode,
        jvp_kernels=cfg.loss.jvp_kernels,
        tip=faster_step_tip(cfg, device, mode, resumed),
    )
