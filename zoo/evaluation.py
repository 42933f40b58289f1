"""Sample quality by exact energy distance to held-out data, for every sampler a model supports.

Every method starts from the same noise (common random numbers): differences between rows are
then differences between samplers, not between noise draws.  The data-vs-data row (training
samples against held-out samples) is the floor no model can be expected to beat at this n.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from zoo.config.schema import EvalConfig
from zoo.data import BatchSource
from zoo.metrics.energy import energy_distance
from zoo.models.base import FlowModel
from zoo.solvers.ode import get_solver, steps_for_nfe
from zoo.solvers.samplers import sample_meanflow, sample_ode


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


@dataclass
class EvalReport:
    n_samples: int
    rows: list[EvalRow] = field(default_factory=list)
    noise_floor: EvalRow | None = None

    def to_dict(self) -> dict:
        return {
            "n_samples": self.n_samples,
            "rows": [asdict(r) for r in self.rows],
            "noise_floor": asdict(self.noise_floor) if self.noise_floor else None,
        }

    def metrics(self) -> dict[str, float]:
        """Flat `eval/...` metrics for trackio and metrics.jsonl."""
        out = {}
        for row in self.rows:
            key = f"eval/energy_{row.kind}_{row.steps}"
            out[key] = row.energy_distance
            out[key + "_se"] = row.stderr
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


def no_progress() -> None:
    """The default progress callback of generate and evaluate: nobody to tell."""


@torch.no_grad()
def generate(
    model: FlowModel,
    method: Method,
    noise: Tensor,
    labels: Tensor | None,
    guidance: float,
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
    was_training = model.training
    model.eval()
    methods = methods if methods is not None else default_methods(cfg, meanflow)
    held_out = source.held_out(cfg.n_samples).float().cpu()
    n = held_out.shape[0]
    on_progress()
    noise, labels = draw_noise_and_labels(model, n, device, seed)
    report = EvalReport(n_samples=n)
    task = progress.add_task("evaluating", total=len(methods)) if progress is not None else None
    for method in methods:
        samples = generate(model, method, noise, labels, cfg.guidance, cfg.batch_size, on_batch=on_progress)
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
    model.train(was_training)
    return report
