"""`zoo bench-jvp`: what MeanFlow's JVP costs, against a forward pass and a flow-matching step.

Cases, all on one model, one Adam optimiser and one fixed synthetic batch, in one process:
    forward                no-grad forward of the batch
    jvp                    no-grad JVP (primal + tangent) of the batch, every sample with r != t
    fm_step                flow-matching training step (loss + backward + Adam)
    meanflow/MODE/RATIO    MeanFlow training step with JVP strategy MODE at loss.ratio RATIO
    OBJECTIVE/RATIO        with --objectives: an iMF step (unconditional, or class-conditional with
                           guidance inputs: imf_cond) or an alpha-Flow step at alpha = 1/2 (no JVP),
                           fused, on the preset's network with what that objective adds (iMF's
                           v-head), compared with the FM step of the preset's own network
With --cuda-graph (CUDA) each step is also timed with its loss + backward replayed from a CUDA
graph, as `train.cuda_graph = true` trains: fm_step+graph, and meanflow/MODE/RATIO+graph for
every mode that can run inside a capture; those MeanFlow steps are compared with fm_step+graph
(like with like), and the summary also gives their ratio to the eager FM step.  With --compile
each step is also timed with its loss + backward compiled, as `train.compile = true` trains
(zoo.training.compiled_step; --compile-mode picks torch.compile's mode): fm_step+compile and
meanflow/fused/RATIO+compile (the one JVP mode torch.compile can trace), compared in the same way.
Each compiled case compiles in its own untimed pass before the memory pass (a case that runs
out of memory while compiling is marked so, as in the memory pass).
First a memory pass runs every case once and records its peak memory (it doubles as the first
warm-up round); then `warmup` more untimed rounds; then `repeats` timed rounds, interleaved
(zoo.bench.timing).  Medians are reported, with the per-round ratio to the FM step (or, for the
JVP, to the forward) and its range as the honest noise band, in wall-clock time and in process
CPU time (the steadier measure on a CPU shared with other jobs).

A case "fits" when its peak is within the memory limit (the device's memory, or
--memory-limit-gb).  On CUDA a case that runs out of memory is marked so and not timed.  A
compiled step's peak is measured on CUDA only: on a CPU it is timed, but whether it fits is
unknown (fits = None), so it is never named the fastest mode that fits (see run_bench).
"""

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.bench.steps import (
    BENCH_CLASSES,
    OBJECTIVES,
    compiled_training_step_fn,
    data_signature,
    flow_matching_loss,
    forward_fn,
    graphed_training_step_fn,
    jvp_fn,
    meanflow_loss,
    objective_loss,
    objective_model_config,
    synthetic_batch,
    training_step_fn,
)
from zoo.bench.timing import RatioStats, Timing, interleaved_timings, paired_ratio
from zoo.config.loading import load_config
from zoo.config.schema import LossConfig
from zoo.devices import enable_cuda_tf32, resolve_device, synchronize
from zoo.losses.jvp import JVP_MODES
from zoo.models import build_model, count_parameters
from zoo.models.base import FlowModel
from zoo.runs import atomic_write_json
from zoo.training import jvp_plan
from zoo.training.compiled_step import COMPILE_MODES, USES_CUDA_GRAPHS
from zoo.training.memory import LiveTensors, parameter_bytes, physical_memory_bytes
from zoo.training.optim import build_optimizer
from zoo.units import format_bytes

FORWARD, JVP, FM_STEP, MEANFLOW_STEP = "forward", "jvp", "fm_step", "meanflow_step"
OBJECTIVE_STEP = "objective_step"
# How a step's loss + backward run: eagerly, replayed from a CUDA graph (train.cuda_graph), or
# compiled (train.compile).  Non-eager cases carry the variant as a suffix: fm_step+graph.
EAGER, GRAPH, COMPILE = "eager", "graph", "compile"
FM_GRAPH_STEP, FM_COMPILED_STEP = f"{FM_STEP}+{GRAPH}", f"{FM_STEP}+{COMPILE}"  # variant_suffix's names
DEFAULT_RATIOS = (0.25, 0.5, 0.75, 1.0)
# The bench's switches for the captured and compiled cases, as jvp_plan's refusals name them.
CUDA_GRAPH_FLAG = jvp_plan.Switch("--cuda-graph", "leave out --cuda-graph")
COMPILE_FLAG = jvp_plan.Switch("--compile", "leave out --compile")


class BenchError(ValueError):
    """Benchmark settings that cannot be run; the message says what to change."""


def variant_suffix(variant: str) -> str:
    return "" if variant == EAGER else f"+{variant}"


def meanflow_case(mode: str, ratio: float, variant: str = EAGER, loss_variant: str = "") -> str:
    return f"meanflow/{mode}/{ratio:g}" + variant_suffix(variant) + loss_variant_suffix(loss_variant)


def loss_variant_suffix(loss_variant: str) -> str:
    """' [loss.jvp_kernels=torch]' for a case timed with a --loss-variant; '' for the run's own loss."""
    return f" [{loss_variant}]" if loss_variant else ""


def loss_variant_overrides(loss_variant: str) -> list[str]:
    """A --loss-variant's overrides: space-separated loss.KEY=VALUE, nothing else (every case shares
    the model, data and optimiser, so only the loss may differ between them)."""
    overrides = loss_variant.split()
    bad = [o for o in overrides if not (o.startswith("loss.") and "=" in o)]
    if not overrides or bad:
        raise BenchError(
            f"--loss-variant {loss_variant!r}: give space-separated loss.KEY=VALUE overrides, "
            "e.g. --loss-variant 'loss.jvp_kernels=torch' (the model, data and optimiser are shared "
            "by every case)"
        )
    # Every case sets these itself (a MeanFlow step per --modes and --ratios), so a variant's would
    # be ignored.
    if fixed := [o for o in overrides if o.split("=", 1)[0] in ("loss.kind", "loss.jvp", "loss.ratio")]:
        raise BenchError(
            f"--loss-variant {loss_variant!r}: {', '.join(fixed)} is set by each case; choose JVP modes with "
            f"--modes and ratios with --ratios"
        )
    return overrides


def tangent_kernels_note(
    settings: "BenchSettings", model: FlowModel, device: torch.device, loss_cfg: LossConfig
) -> str:
    """Which group-norm tangents the fused cases run (loss.jvp_kernels; compiled cases: inductor's)."""
    if "fused" not in (settings.modes or default_modes(device)):
        return ""
    tangents = jvp_plan.group_norm_tangents(model, device, loss_cfg.jvp_kernels, compiled=False)
    if tangents is None:
        return ""
    compiled = jvp_plan.group_norm_tangents(model, device, loss_cfg.jvp_kernels, compiled=True)
    return f", fused group-norm tangents: {tangents}" + (
        f" (compiled cases: {compiled})" if settings.compile else ""
    )


def default_modes(device: torch.device) -> tuple[str, ...]:
    """Every mode that runs on `device`; `compile` only when asked (it compiles for tens of seconds
    to minutes before the first round)."""
    order = ("fused", "full_batch", "primal", "selective", "nograd", "cuda_graph")
    return tuple(m for m in order if m in jvp_plan.runnable_modes(device))


def device_name(device: torch.device) -> str:
    """What the timings belong to: the GPU's name, or the CPU model with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"mps ({platform.machine()})"
    return f"cpu {cpu_model()} x{torch.get_num_threads()} threads"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class BenchSettings:
    preset: str = "cifar10"
    overrides: tuple[str, ...] = ()
    device: str = "cpu"
    batch_size: int = 8
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    modes: tuple[str, ...] | None = None  # None: default_modes(device)
    precision: str = "fp32"  # autocast of every case: fp32 | bf16
    repeats: int = 5
    warmup: int = 1  # untimed rounds after the memory pass
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    memory_limit_gb: float | None = None
    cuda_graph: bool = False  # also time every step with loss + backward replayed from a CUDA graph
    compile: bool = False  # also time FM and fused MeanFlow steps with loss + backward compiled
    compile_mode: str = "default"  # torch.compile's mode for those cases
    # Each also times every MeanFlow step with these loss overrides ("loss.jvp_kernels=torch"), in
    # this process: an A/B of two loss settings on the same model, batch and FM step.
    loss_variants: tuple[str, ...] = ()
    objectives: tuple[str, ...] = ()  # also time these objectives' steps (zoo.bench.steps.OBJECTIVES)

    def check(self) -> None:
        if self.batch_size < 1:
            raise BenchError(f"batch size must be >= 1, got {self.batch_size}")
        if self.precision not in ("fp32", "bf16"):
            raise BenchError(f"precision must be fp32 or bf16, got {self.precision!r}")
        bad = [r for r in self.ratios if not 0.0 <= r <= 1.0]
        if bad or not self.ratios:
            raise BenchError(f"ratios must be a non-empty list of numbers in [0, 1], got {list(self.ratios)}")
        unknown = [m for m in self.modes or () if m not in JVP_MODES]
        if unknown:
            raise BenchError(f"unknown JVP mode(s) {unknown}; choose from {list(JVP_MODES)}")
        if self.repeats < 1 or self.warmup < 0:
            raise BenchError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if self.compile_mode not in COMPILE_MODES:
            raise BenchError(
                f"unknown --compile-mode {self.compile_mode!r}; choose from {list(COMPILE_MODES)}"
            )
        unknown_objectives = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown_objectives:
            raise BenchError(f"unknown objective(s) {unknown_objectives}; choose from {list(OBJECTIVES)}")
        for loss_variant in self.loss_variants:
            loss_variant_overrides(loss_variant)
        if len(set(self.loss_variants)) < len(self.loss_variants):
            raise BenchError(
                f"--loss-variant given twice with the same overrides: {list(self.loss_variants)}"
            )


@dataclass(frozen=True)
class BenchCase:
    name: str
    kind: str  # FORWARD | JVP | FM_STEP | MEANFLOW_STEP
    run: Callable[[], None]
    mode: str | None = None
    ratio: float | None = None
    variant: str = EAGER  # EAGER | GRAPH | COMPILE
    reference: str | None = None  # the case whose time this one is compared with
    loss_variant: str = ""  # a MeanFlow step's --loss-variant ("": the run's own loss)
    objective: str = ""  # an OBJECTIVE_STEP's objective


@dataclass
class CaseResult:
    name: str
    kind: str
    mode: str | None
    ratio: float | None
    variant: str
    peak_bytes: int | None  # None: ran out of memory (CUDA), or not measured (peak_measured)
    fits: bool | None  # None: peak not measured
    loss_variant: str = ""  # a MeanFlow step's --loss-variant ("": the run's own loss)
    peak_measured: bool = True  # False: a compiled step on a CPU, which the memory meter cannot watch
    samples_s: list[float] = field(default_factory=list)  # empty when it did not fit
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    cpu_samples_s: list[float] = field(default_factory=list)  # process CPU time (zoo.bench.timing)
    cpu_median_s: float | None = None
    reference: str | None = None  # the case `versus` compares with
    versus: RatioStats | None = None  # wall-clock ratio to the reference
    versus_cpu: RatioStats | None = None  # CPU-time ratio to the reference
    # A graphed or compiled step's wall-clock ratio to the eager FM step.
    versus_eager: RatioStats | None = None
    # A --loss-variant step's wall-clock ratio to the same step with the run's loss.
    versus_own_loss: RatioStats | None = None
    objective: str = ""  # an OBJECTIVE_STEP's objective

    @property
    def label(self) -> str | None:
        """The JVP mode, with +graph / +compile for a step replayed from a CUDA graph / compiled, and
        the loss overrides of a --loss-variant in brackets."""
        return (
            None
            if self.mode is None
            else self.mode + variant_suffix(self.variant) + loss_variant_suffix(self.loss_variant)
        )


@dataclass
class BenchResult:
    settings: BenchSettings
    device: str
    device_name: str
    torch_version: str
    threads: int
    parameters: int
    data_shape: list[int]
    memory_limit_bytes: int
    cases: list[CaseResult]
    seconds: float

    def case(self, name: str) -> CaseResult:
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(f"no case {name!r}; cases: {[c.name for c in self.cases]}")

    def fastest(self, ratio: float) -> CaseResult | None:
        """The fastest MeanFlow step at `ratio` among the modes known to fit (None if none does):
        a step whose peak was not measured is not a candidate."""
        fitting = [c for c in self.cases if c.kind == MEANFLOW_STEP and c.ratio == ratio and c.fits]
        return min(fitting, key=lambda c: c.median_s, default=None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fastest"] = {
            f"{r:g}": (c.label if (c := self.fastest(r)) else None) for r in self.settings.ratios
        }
        return data

    def write_json(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())


def build_cases(
    settings: BenchSettings,
    model: FlowModel,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    loss_base: LossConfig,
    loss_variants: dict[str, LossConfig] | None = None,
    objective_models: dict[str, tuple[FlowModel, torch.optim.Optimizer]] | None = None,
) -> list[BenchCase]:
    """The cases in the order they run each round; loss_variants: --loss-variant -> its loss config,
    whose MeanFlow steps are added after the run's own, against the same FM steps."""
    batch = synthetic_batch(model, settings.batch_size, device, loss_base, seed=settings.seed)
    modes = settings.modes or default_modes(device)
    precision, seed = settings.precision, settings.seed
    fm_loss = flow_matching_loss(loss_base)
    cases = [
        BenchCase(FORWARD, FORWARD, forward_fn(model, batch, precision)),
        BenchCase(JVP, JVP, jvp_fn(model, batch, precision, loss_base.jvp_precision), reference=FORWARD),
        BenchCase(FM_STEP, FM_STEP, training_step_fn(model, optimizer, fm_loss, batch, precision, seed)),
    ]
    # The captured cases' graphs share one memory pool: they never run at the same time.
    pool = torch.cuda.graph_pool_handle() if settings.cuda_graph else None
    if settings.cuda_graph:
        graphed = graphed_training_step_fn(model, optimizer, fm_loss, batch, precision, seed, pool)
        cases.append(BenchCase(FM_GRAPH_STEP, FM_STEP, graphed, variant=GRAPH))
    if settings.compile:
        compiled = compiled_training_step_fn(
            model, optimizer, fm_loss, batch, precision, settings.compile_mode, seed
        )
        cases.append(BenchCase(FM_COMPILED_STEP, FM_STEP, compiled, variant=COMPILE))
    for loss_variant, loss_cfg in {"": loss_base, **(loss_variants or {})}.items():
        for ratio in settings.ratios:
            cases += meanflow_cases(
                settings, model, optimizer, batch, modes, loss_cfg, ratio, loss_variant, pool
            )
    for objective, (net, net_optimizer) in (objective_models or {}).items():
        net_batch = synthetic_batch(net, settings.batch_size, device, loss_base, seed=seed)
        for ratio in settings.ratios:
            loss_fn = objective_loss(loss_base, objective, ratio)
            step = training_step_fn(net, net_optimizer, loss_fn, net_batch, precision, seed)
            name = f"{objective}/{ratio:g}"
            cases.append(
                BenchCase(name, OBJECTIVE_STEP, step, "fused", ratio, reference=FM_STEP, objective=objective)
            )
    return cases


def build_objective_models(
    settings: BenchSettings, cfg, data_shape: tuple[int, ...], num_classes: int, device: torch.device
) -> dict[str, tuple[FlowModel, torch.optim.Optimizer]]:
    """Each --objectives case's network (the preset's, with what the objective adds) and optimiser."""
    models = {}
    for objective in settings.objectives:
        classes = (num_classes or BENCH_CLASSES) if OBJECTIVES[objective][2] else 0
        torch.manual_seed(settings.seed)
        net = build_model(objective_model_config(cfg.model, objective), data_shape, classes)
        net = net.to(device).train()
        models[objective] = (net, build_optimizer(net, cfg.optim))
    return models


def meanflow_cases(
    settings: BenchSettings,
    model: FlowModel,
    optimizer: torch.optim.Optimizer,
    batch,
    modes: tuple[str, ...],
    loss_cfg: LossConfig,
    ratio: float,
    loss_variant: str,
    pool,
) -> list[BenchCase]:
    """The MeanFlow steps at one ratio with one loss: eager per mode, then captured, then compiled."""
    precision, seed = settings.precision, settings.seed
    cases = []
    for mode in modes:
        step = training_step_fn(
            model, optimizer, meanflow_loss(loss_cfg, mode, ratio), batch, precision, seed
        )
        name = meanflow_case(mode, ratio, EAGER, loss_variant)
        cases.append(
            BenchCase(name, MEANFLOW_STEP, step, mode, ratio, reference=FM_STEP, loss_variant=loss_variant)
        )
    for mode in modes if settings.cuda_graph else ():
        if mode in jvp_plan.NOT_CAPTURABLE:
            continue
        step = graphed_training_step_fn(
            model, optimizer, meanflow_loss(loss_cfg, mode, ratio), batch, precision, seed, pool
        )
        name = meanflow_case(mode, ratio, GRAPH, loss_variant)
        cases.append(
            BenchCase(
                name,
                MEANFLOW_STEP,
                step,
                mode,
                ratio,
                GRAPH,
                reference=FM_GRAPH_STEP,
                loss_variant=loss_variant,
            )
        )
    for mode in modes if settings.compile else ():
        if mode not in jvp_plan.COMPILABLE:
            continue
        loss_fn = meanflow_loss(loss_cfg, mode, ratio)
        step = compiled_training_step_fn(
            model, optimizer, loss_fn, batch, precision, settings.compile_mode, seed
        )
        name = meanflow_case(mode, ratio, COMPILE, loss_variant)
        cases.append(
            BenchCase(
                name,
                MEANFLOW_STEP,
                step,
                mode,
                ratio,
                COMPILE,
                reference=FM_COMPILED_STEP,
                loss_variant=loss_variant,
            )
        )
    return cases


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Tensor memory that lives across steps: parameters, gradients present, optimiser state."""
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(
        value.numel() * value.element_size()
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor)
    )
    return parameter_bytes(model) + grads + state


def cudagraph_skips_note(device: torch.device, compile_mode: str) -> str:
    """Under compile modes with CUDA graphs, how many graphs inductor has so far left uncaptured
    (it says why only in its `cudagraphs` log, off by default): such a case replays kernels
    one by one and is no measurement of its mode."""
    if device.type != "cuda" or compile_mode not in USES_CUDA_GRAPHS:
        return ""
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    return f", CUDA graphs skipped so far: {skips}" + (
        " — rerun with TORCH_LOGS=cudagraphs for why" if skips else ""
    )


def compile_case(run: Callable[[], None], device: torch.device, optimizer: torch.optim.Optimizer) -> bool:
    """Run a compiled case once, which compiles it; False if it ran out of memory (CUDA)."""
    try:
        run()
        synchronize(device)
    except (torch.OutOfMemoryError, torch._dynamo.exc.BackendCompilerFailed) as exc:
        # Out of memory inside the compiler (inductor benchmarking kernels) arrives wrapped.
        if isinstance(exc, torch._dynamo.exc.BackendCompilerFailed) and not isinstance(
            exc.inner_exception, torch.OutOfMemoryError
        ):
            raise
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False
    return True


def measure_peak(
    run: Callable[[], None], device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> int | None:
    """Peak memory of one call: CUDA's allocator peak (None on out-of-memory), elsewhere the
    exact peak of live tensor memory (zoo.training.memory.LiveTensors) on top of what is resident."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            run()
            torch.cuda.synchronize(device)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return None
        return torch.cuda.max_memory_allocated(device)
    resident = resident_bytes(model, optimizer)
    with LiveTensors() as live:
        run()
    return resident + live.peak_bytes


def check_compile_settings(settings: BenchSettings, device: torch.device, jvp_precision: str) -> None:
    """--compile's requirements: a mode it can compile among --modes, and train.compile's own."""
    modes = settings.modes or default_modes(device)
    if not set(modes) & set(jvp_plan.COMPILABLE):
        raise BenchError(
            f"--compile times the JVP modes {list(jvp_plan.COMPILABLE)} only; add one to --modes"
        )
    jvp_plan.check_compile(device, "meanflow", jvp_plan.COMPILABLE[0], jvp_precision, switch=COMPILE_FLAG)


def memory_limit_bytes(device: torch.device, limit_gb: float | None) -> int:
    if limit_gb:
        return int(limit_gb * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory_bytes()


def run_bench(settings: BenchSettings, log: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Build the model from the preset, run every case, and collect medians, ratios and peaks."""
    settings.check()
    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    for mode in settings.modes or ():
        if mode not in jvp_plan.runnable_modes(device):
            raise BenchError(f"JVP mode {mode} needs a CUDA device, not {device}; leave it out of --modes")
    if settings.cuda_graph:
        jvp_plan.check_capture(device, settings.precision, None, switch=CUDA_GRAPH_FLAG)
    if device.type == "cuda":
        enable_cuda_tf32()  # what the trainer sets on CUDA: time what training runs
    cfg = load_config(settings.preset, list(settings.overrides))
    loss_variants = {
        v: load_config(settings.preset, [*settings.overrides, *loss_variant_overrides(v)]).loss
        for v in settings.loss_variants
    }
    for loss_cfg in (cfg.loss, *loss_variants.values()) if settings.compile else ():
        check_compile_settings(settings, device, loss_cfg.jvp_precision)
    data_shape, num_classes = data_signature(cfg.data)
    torch.manual_seed(settings.seed)
    model = build_model(cfg.model, data_shape, num_classes).to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    objective_models = build_objective_models(settings, cfg, data_shape, num_classes, device)
    cases = build_cases(settings, model, optimizer, device, cfg.loss, loss_variants, objective_models)
    limit = memory_limit_bytes(device, settings.memory_limit_gb)
    log(
        f"{settings.preset}: {count_parameters(model) / 1e6:.1f}M parameters, data {tuple(data_shape)}, "
        f"batch {settings.batch_size}, {settings.precision}, {device_name(device)}, {len(cases)} cases"
        + tangent_kernels_note(settings, model, device, cfg.loss)
    )

    # Compile before anything is measured or timed (even with --warmup 0).  On a CPU the memory
    # meter (a TorchDispatchMode) would make torch.compile run the step eagerly, so a compiled
    # step's CPU peak is not measured; on CUDA the allocator's peak is the compiled step's own.
    peaks: dict[str, int | None] = {}
    for case in cases:
        if case.variant == COMPILE:
            tick = time.perf_counter()
            if not compile_case(case.run, device, optimizer):
                peaks[case.name] = None
            shown = "out of memory" if case.name in peaks else f"{time.perf_counter() - tick:.1f} s"
            log(
                f"compiled     {case.name:24s} ({shown}{cudagraph_skips_note(device, settings.compile_mode)})"
            )
    unmeasured = {c.name for c in cases if c.variant == COMPILE and device.type != "cuda"}
    # One untimed training step first, so that every case's peak includes Adam's moments (a
    # training step's resident state) — without it the first step measured would lack them.
    measure_peak(next(case for case in cases if case.name == FM_STEP).run, device, model, optimizer)
    for case in cases:
        if case.name in unmeasured or case.name in peaks:
            continue
        tick = time.perf_counter()
        peaks[case.name] = measure_peak(case.run, device, model, optimizer)
        shown = "out of memory" if peaks[case.name] is None else format_bytes(peaks[case.name])
        log(f"memory pass  {case.name:24s} peak {shown:>12s}  ({time.perf_counter() - tick:.1f} s)")
    fitting = {
        c.name: c.run
        for c in cases
        if c.name in unmeasured or (peaks[c.name] is not None and peaks[c.name] <= limit)
    }

    def progress(name: str, round_index: int, seconds: float) -> None:
        log(f"round {round_index + 1}/{settings.repeats}  {name:24s} {seconds * 1e3:10.1f} ms")

    timings = {}
    if fitting:
        timings = interleaved_timings(
            fitting, settings.repeats, settings.warmup, sync=lambda: synchronize(device), on_sample=progress
        )
    results = [
        case_result(case, peaks.get(case.name), limit, timings, case.name not in unmeasured) for case in cases
    ]
    return BenchResult(
        settings=settings,
        device=str(device),
        device_name=device_name(device),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        parameters=count_parameters(model),
        data_shape=list(data_shape),
        memory_limit_bytes=limit,
        cases=results,
        seconds=time.perf_counter() - started,
    )


def case_result(
    case: BenchCase, peak: int | None, limit: int, timings: dict[str, Timing], peak_measured: bool = True
) -> CaseResult:
    result = CaseResult(
        name=case.name,
        kind=case.kind,
        mode=case.mode,
        ratio=case.ratio,
        variant=case.variant,
        peak_bytes=peak,
        loss_variant=case.loss_variant,
        objective=case.objective,
        fits=(peak is not None and peak <= limit) if peak_measured else None,
        peak_measured=peak_measured,
    )
    if case.name not in timings:
        return result
    timing = timings[case.name]
    result.samples_s = timing.samples
    result.median_s = timing.median
    result.q1_s, result.q3_s = timing.quartiles
    result.cpu_samples_s = timing.cpu_samples
    result.cpu_median_s = timing.cpu().median
    if case.reference is not None and case.reference in timings:
        result.reference = case.reference
        result.versus = paired_ratio(timing, timings[case.reference])
        result.versus_cpu = paired_ratio(timing.cpu(), timings[case.reference].cpu())
    if case.variant != EAGER and case.kind == MEANFLOW_STEP and FM_STEP in timings:
        result.versus_eager = paired_ratio(timing, timings[FM_STEP])
    if case.loss_variant and (own := meanflow_case(case.mode, case.ratio, case.variant)) in timings:
        result.versus_own_loss = paired_ratio(timing, timings[own])  # the A/B a --loss-variant is for
    return result


def parse_ratios(text: str) -> tuple[float, ...]:
    """'0.25,0.75' -> (0.25, 0.75)."""
    try:
        ratios = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchError(
            f"--ratios must be comma-separated numbers such as 0.25,0.75, got {text!r}"
        ) from None
    return ratios


def parse_modes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())
