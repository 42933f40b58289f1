"""Sample quality by exact energy distance to held-out data, for every sampler a model supports.

Every method starts from the same noise (common random numbers): differences between rows are
then differences between samplers, not between noise draws.  The data-vs-data row (training
samples against held-out samples) is the floor no model can be expected to beat at this n.
`evaluate_fid` adds FID for one method (image datasets with clean-fid statistics, zoo.metrics.fid).
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from zoo.config.schema import EvalConfig
from zoo.data import BatchSource
from zoo.metrics.energy import energy_distance
from zoo.metrics.fid import FidBackend, fid_of_generator
from zoo.models.base import FlowModel
from zoo.solvers.ode import get_solver, steps_for_nfe
from zoo.solvers.samplers import Guidance, sample_meanflow, sample_ode, sampler_guidance


@contextlib.contextmanager
def eval_mode(model: FlowModel) -> Iterator[None]:
    """The model in eval mode (no dropout) for sampling, and back to its own mode afterwards,
    however the block ends: Ctrl-C or a failing metric must not leave a training model in eval."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Method:
    """One way to sample: MeanFlow jumps on a uniform grid, or an ODE solver over u(z, t, t)."""

    kind: str  # "meanflow" or a solver name
    steps: int
    nfe: int

    @property
    def label(self) -> str:
        if self.kind == "meanflow":
            return f"MeanFlow {self.steps}-step"
        return f"{self.kind.capitalize()} {self.steps} steps"


@dataclass
class EvalRow:
    method: str
    kind: str
    steps: int
    nfe: int
    energy_distance: float
    stderr: float
    fid: float | None = None  # set on the row of the method FID was computed for

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (k == "fid" and v is None)}


@dataclass
class FidInfo:
    """How the FID in a report was measured."""

    method: str
    n_samples: int
    reference: str  # e.g. "cifar10 train statistics at 32 px"
    value: float


@dataclass
class EvalReport:
    n_samples: int
    rows: list[EvalRow] = field(default_factory=list)
    noise_floor: EvalRow | None = None
    fid: FidInfo | None = None

    def to_dict(self) -> dict:
        out = {
            "n_samples": self.n_samples,
            "rows": [r.to_dict() for r in self.rows],
            "noise_floor": self.noise_floor.to_dict() if self.noise_floor else None,
        }
        if self.fid is not None:
            out["fid"] = asdict(self.fid)
        return out

    def record_fid(self, method: "Method", info: FidInfo) -> None:
        """Put the FID on `method`'s row (evaluate it with that method among its rows)."""
        row = next(r for r in self.rows if (r.kind, r.steps) == (method.kind, method.steps))
        row.fid = info.value
        self.fid = info

    def metrics(self) -> dict[str, float]:
        """Flat `eval/...` metrics for trackio and metrics.jsonl."""
        out = {}
        for row in self.rows:
            key = f"eval/energy_{row.kind}_{row.steps}"
            out[key] = row.energy_distance
            out[key + "_se"] = row.stderr
            if row.fid is not None:
                out[f"eval/fid_{row.kind}_{row.steps}"] = row.fid
        if self.noise_floor:
            out["eval/energy_data_floor"] = self.noise_floor.energy_distance
        return out


def default_methods(cfg: EvalConfig, meanflow: bool) -> list[Method]:
    methods = [Method("meanflow", k, k) for k in cfg.meanflow_steps] if meanflow else []
    for solver_name in cfg.solvers:
        solver = get_solver(solver_name)
        for nfe in cfg.solver_nfe:
            if nfe % solver.calls_per_step == 0:
                methods.append(Method(solver_name, steps_for_nfe(solver, nfe), nfe))
    return methods


def pick_method(
    meanflow: bool, solver: str | None, nfe: int | None, default_solver: str, default_nfe: int
) -> Method:
    """One sampler from what the user asked for: MeanFlow jumps (default 1 NFE) for a MeanFlow
    model unless an ODE `solver` is given; otherwise `solver` (default `default_solver`) at `nfe`
    evaluations (default `default_nfe`, rounded up to a multiple of the solver's calls per step,
    e.g. rk4 50 -> 52).  A bad solver name or NFE is a ValueError naming the fix."""
    if solver in (None, "meanflow") and meanflow:
        steps = nfe or 1
        return Method("meanflow", steps, steps)
    if solver == "meanflow":
        raise ValueError(
            "MeanFlow jumps need a MeanFlow model; this one was trained by flow matching: pick an ODE solver"
        )
    ode = get_solver(solver or default_solver)
    if nfe is None:
        nfe = -(-default_nfe // ode.calls_per_step) * ode.calls_per_step
    return Method(ode.name, steps_for_nfe(ode, nfe), nfe)


def headline_solver(cfg: EvalConfig) -> str:
    """The ODE solver of the headline sampler: the run's first eval solver, else euler."""
    return cfg.solvers[0] if cfg.solvers else "euler"


def headline_method(
    cfg: EvalConfig, meanflow: bool, solver: str | None = None, nfe: int | None = None
) -> Method:
    """The one sampler a single number (FID) or a picture is reported for, in `zoo eval` and in
    training's sample grids: the run's first eval solver (else euler) at its largest
    eval.solver_nfe, unless the model is a MeanFlow model or `solver`/`nfe` say otherwise."""
    return pick_method(meanflow, solver, nfe, headline_solver(cfg), max(cfg.solver_nfe))


def no_progress() -> None:
    """The default progress callback of generate and evaluate: nobody to tell."""


@torch.no_grad()
def generate(
    model: FlowModel,
    method: Method,
    noise: Tensor,
    labels: Tensor | None,
    guidance: "float | Guidance",
    batch_size: int,
    on_batch: Callable[[], None] = no_progress,
) -> Tensor:
    """Samples for `noise` (on the model's device), in batches, returned on the CPU.

    `on_batch` is called after each batch (the trainer keeps its heartbeat fresh with it).
    """
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        z = noise[start : start + batch_size]
        y = labels[start : start + batch_size] if labels is not None else None
        if method.kind == "meanflow":
            x = sample_meanflow(model, z, method.steps, y=y, guidance=guidance)
        else:
            x = sample_ode(model, z, method.kind, method.steps, y=y, guidance=guidance)
        outputs.append(x.float().cpu())
        on_batch()
    return torch.cat(outputs)


def draw_noise_and_labels(
    model: FlowModel, n: int, device: torch.device, seed: int
) -> tuple[Tensor, Tensor | None]:
    """Evaluation noise from its own generator: evaluation never touches the training RNG."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((n, *model.data_shape), generator=generator).to(device)
    labels = None
    if model.num_classes:
        labels = torch.randint(0, model.num_classes, (n,), generator=generator).to(device)
    return noise, labels


def evaluate(
    model: FlowModel,
    source: BatchSource,
    cfg: EvalConfig,
    meanflow: bool,
    seed: int = 0,
    methods: list[Method] | None = None,
    with_floor: bool = True,
    progress=None,
    on_progress: Callable[[], None] = no_progress,
) -> EvalReport:
    """Energy distance of each method's samples to `cfg.n_samples` held-out samples.

    `on_progress` is called after each piece of work: a sampled batch, a metric.
    """
    device = next(model.parameters()).device
    methods = methods if methods is not None else default_methods(cfg, meanflow)
    held_out = source.held_out(cfg.n_samples).float().cpu()
    n = held_out.shape[0]
    on_progress()
    noise, labels = draw_noise_and_labels(model, n, device, seed)
    report = EvalReport(n_samples=n)
    task = progress.add_task("evaluating", total=len(methods)) if progress is not None else None
    with eval_mode(model):
        for method in methods:
            samples = generate(
                model, method, noise, labels, sampler_guidance(cfg), cfg.batch_size, on_batch=on_progress
            )
            result = energy_distance(samples, held_out)
            on_progress()
            report.rows.append(
                EvalRow(method.label, method.kind, method.steps, method.nfe, result.value, result.stderr)
            )
            if progress is not None:
                progress.advance(task)
    if with_floor:
        reference = source.reference(n).float().cpu()
        floor = energy_distance(reference, held_out)
        on_progress()
        report.noise_floor = EvalRow("data vs data", "data", 0, 0, floor.value, floor.stderr)
    if progress is not None:
        progress.remove_task(task)
    return report


def fid_noise_stream(model: FlowModel, seed: int) -> Callable[[int], tuple[Tensor, Tensor | None]]:
    """Noise (and labels) for FID, k at a time from one seeded generator: 50k images never sit in
    memory at once, and the samples depend on the seed only, not on the batch size."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(k: int) -> tuple[Tensor, Tensor | None]:
        noise = torch.randn((k, *model.data_shape), generator=generator)
        labels = torch.randint(0, model.num_classes, (k,), generator=generator) if model.num_classes else None
        return noise.to(device), labels.to(device) if labels is not None else None

    return draw


def evaluate_fid(
    model: FlowModel,
    method: Method,
    backend: FidBackend,
    n: int,
    batch_size: int,
    guidance: "float | Guidance",
    seed: int = 0,
    on_batch: Callable[[], None] = no_progress,
) -> FidInfo:
    """FID of `n` samples of `method` against the backend's reference statistics."""
    device = next(model.parameters()).device
    draw = fid_noise_stream(model, seed)

    def generate_fn(k: int) -> Tensor:
        noise, labels = draw(k)
        return generate(model, method, noise, labels, guidance, batch_size, on_batch=on_batch)

    with eval_mode(model):
        value = fid_of_generator(backend, generate_fn, n, batch_size, device)
    return FidInfo(method=method.label, n_samples=n, reference=backend.reference.describe(), value=value)
