"""Sample quality for every sampler a model supports, beside the data-vs-data floor.

2-D data is scored by exact energy distance to held-out data.  Images are scored in the feature
space of a classifier zoo trains per dataset (zoo.metrics.features): Fréchet distance, KID,
precision and recall (zoo.metrics.feature_metrics), each with its standard error and n, plus
class fidelity (the floor row's: the classifier's accuracy on the held-out images) and per-class
FD for class-conditional models; energy distance in pixel space
stays as a column.  Every method starts from the same noise (common random numbers):
differences between rows are then differences between samplers, not between noise draws.  The
data-vs-data row (training samples against held-out samples) is the floor no model can be
expected to beat at this n.  `evaluate_fid` adds FID for one method (image datasets with
clean-fid statistics, zoo.metrics.fid).
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from zoo.config.schema import DataConfig, EvalConfig
from zoo.data import BatchSource
from zoo.data.base import random_flip
from zoo.errors import MetricInputError
from zoo.metrics.energy import energy_distance
from zoo.metrics.feature_metrics import (
    FD_JACKKNIFE_GROUPS,
    MIN_SAMPLES,
    Estimate,
    class_fidelity,
    per_class_fd,
    required_samples,
    score_features,
)
from zoo.metrics.features import NO_LABELS, FeatureNet, load_feature_net
from zoo.metrics.fid import FidBackend, fid_of_generator
from zoo.models.base import FlowModel
from zoo.plotting import save_quality_vs_nfe
from zoo.solvers.ode import get_solver, steps_for_nfe
from zoo.solvers.samplers import Guidance, as_guidance, sample_meanflow, sample_ode, sampler_guidance
from zoo.units import format_estimate


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
        return f"{self.kind.capitalize()} {self.steps} step{'s' if self.steps != 1 else ''}"


@dataclass
class EvalRow:
    method: str
    kind: str
    steps: int
    nfe: int
    energy_distance: float
    stderr: float
    guidance: float = 1.0
    # Feature-space metrics of image data: "fd", "kid", "precision", "recall".
    scores: dict[str, Estimate] = field(default_factory=dict)
    # Class-conditional models: the feature classifier's accuracy on samples generated for class
    # y (on the floor row: on the held-out images, what real images score), and FD per class
    # (class name -> FD against that class's held-out images).
    class_fidelity: Estimate | None = None
    per_class_fd: dict[str, Estimate] = field(default_factory=dict)
    fid: float | None = None  # set on the row of the method FID was computed for
    inception_score: float | None = None  # beside the FID, when its scorer gives one

    @property
    def key(self) -> str:
        """The row's name in flat metrics: e.g. meanflow_1, heun_4, euler_8_g2."""
        guided = f"_g{self.guidance:g}" if self.guidance != 1.0 else ""
        return f"{self.kind}_{self.steps}{guided}"

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("fid", "inception_score", "class_fidelity"):
            if out[name] is None:
                del out[name]
        if not out["per_class_fd"]:
            del out["per_class_fd"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EvalRow":
        """A row as `to_dict` wrote it (rows written before feature metrics existed included)."""
        data = dict(data)
        data["scores"] = {k: Estimate(**v) for k, v in data.get("scores", {}).items()}
        data["per_class_fd"] = {k: Estimate(**v) for k, v in data.get("per_class_fd", {}).items()}
        if data.get("class_fidelity") is not None:
            data["class_fidelity"] = Estimate(**data["class_fidelity"])
        return cls(**data)


@dataclass
class FidInfo:
    """How the FID in a report was measured."""

    method: str
    n_samples: int
    reference: str  # e.g. "cifar10 train statistics at 32 px"
    value: float
    guidance: float = 1.0  # the classifier-free guidance scale the images were drawn at
    # Inception Score of the same images (and its spread over splits) when the scorer gives one.
    inception_score: float | None = None
    inception_score_std: float | None = None

    def summary(self) -> str:
        """The FID (and IS) with how it was measured, in one line."""
        inception = (
            f", IS {self.inception_score:.2f} ± {self.inception_score_std:.2f}"
            if self.inception_score is not None
            else ""
        )
        return (
            f"FID {self.value:.3f}{inception} ({self.method}, guidance {self.guidance:g}, "
            f"{self.n_samples} images vs {self.reference})"
        )


@dataclass
class EvalReport:
    n_samples: int
    rows: list[EvalRow] = field(default_factory=list)
    noise_floor: EvalRow | None = None
    fid: FidInfo | None = None
    features: str | None = None  # the feature network of `scores`, when the data are images
    notes: list[str] = field(default_factory=list)  # what was left out, and why

    def to_dict(self) -> dict:
        out = {
            "n_samples": self.n_samples,
            "rows": [r.to_dict() for r in self.rows],
            "noise_floor": self.noise_floor.to_dict() if self.noise_floor else None,
        }
        if self.features is not None:
            out["features"] = self.features
        if self.notes:
            out["notes"] = self.notes
        if self.fid is not None:
            out["fid"] = asdict(self.fid)
        best = self.best_row
        if best is not None:
            metric = self.headline_metric
            out["best"] = {
                "metric": metric,
                "row": best.key,
                "method": best.method,
                "guidance": best.guidance,
                "value": value_of(best, metric)[0],
            }
            if len({r.guidance for r in self.rows}) > 1:
                out["best"]["guidance_by_sampler"] = self.best_guidance()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EvalReport":
        floor = data.get("noise_floor")
        return cls(
            n_samples=data["n_samples"],
            rows=[EvalRow.from_dict(r) for r in data["rows"]],
            noise_floor=EvalRow.from_dict(floor) if floor else None,
            fid=FidInfo(**data["fid"]) if data.get("fid") else None,
            features=data.get("features"),
            notes=data.get("notes", []),
        )

    def record_fid(self, method: "Method", info: FidInfo) -> None:
        """Put the FID on the row of `method` at the guidance scale it was measured at (evaluate
        it with that method and scale among its rows)."""
        measured = (method.kind, method.steps, info.guidance)
        row = next(r for r in self.rows if (r.kind, r.steps, r.guidance) == measured)
        row.fid = info.value
        row.inception_score = info.inception_score
        self.fid = info

    @property
    def headline_metric(self) -> str:
        """What quality is judged by: FD for images, energy distance for other data."""
        return "fd" if self.features is not None else "energy_distance"

    @property
    def best_row(self) -> EvalRow | None:
        """The row whose headline metric is lowest: the best sampler and guidance scale."""
        metric = self.headline_metric
        return min(self.rows, key=lambda row: value_of(row, metric)[0], default=None)

    def best_guidance(self) -> dict[str, float]:
        """Each sampler's guidance scale with the lowest headline metric (keys as meanflow_1)."""
        metric = self.headline_metric
        best: dict[str, EvalRow] = {}
        for row in self.rows:
            key = f"{row.kind}_{row.steps}"
            if key not in best or value_of(row, metric)[0] < value_of(best[key], metric)[0]:
                best[key] = row
        return {key: row.guidance for key, row in best.items()}

    def metrics(self) -> dict[str, float]:
        """Flat `eval/...` metrics for trackio and metrics.jsonl."""
        out = {}
        for row in self.rows:
            out.update(row_metrics(row, row.key))
        if self.noise_floor:
            out.update(row_metrics(self.noise_floor, "data_floor"))
        return out


def row_metrics(row: EvalRow, key: str) -> dict[str, float]:
    """One row's values (and standard errors, `_se`) as eval/<metric>_<key>."""
    out = {f"eval/energy_{key}": row.energy_distance, f"eval/energy_{key}_se": row.stderr}
    named = dict(row.scores)
    if row.class_fidelity is not None:
        named["class_fidelity"] = row.class_fidelity
    for name, estimate in named.items():
        out[f"eval/{name}_{key}"] = estimate.value
        out[f"eval/{name}_{key}_se"] = estimate.stderr
    if row.fid is not None:
        out[f"eval/fid_{key}"] = row.fid
    if row.inception_score is not None:
        out[f"eval/inception_score_{key}"] = row.inception_score
    return out


def value_of(row: EvalRow, metric: str) -> tuple[float, float]:
    """(value, standard error) of `metric` ("energy_distance" or a feature score) on `row`."""
    if metric == "energy_distance":
        return row.energy_distance, row.stderr
    return row.scores[metric].value, row.scores[metric].stderr


def family_of(row: EvalRow) -> str:
    """The sampler family a row belongs to in a quality-vs-NFE plot: MeanFlow or a solver, and the
    guidance scale when there is one."""
    name = "MeanFlow" if row.kind == "meanflow" else row.kind.capitalize()
    return name if row.guidance == 1.0 else f"{name}, guidance {row.guidance:g}"


def quality_curves(
    report: EvalReport, metric: str, prefix: str = ""
) -> list[tuple[str, list[int], list[float], list[float]]]:
    """The report's rows as one (label, NFEs, values, standard errors) curve per sampler family."""
    curves: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for row in report.rows:
        nfes, values, errors = curves.setdefault(prefix + family_of(row), ([], [], []))
        value, stderr = value_of(row, metric)
        nfes.append(row.nfe)
        values.append(value)
        errors.append(stderr)
    return [(label, *curve) for label, curve in curves.items()]


FEATURE_COLUMNS = {"fd": "FD", "kid": "KID", "precision": "precision", "recall": "recall"}


def table_columns(reports: list[EvalReport]) -> list[str]:
    """Column titles of a table of these reports' rows (one dataset, one n): the sampler, its NFE,
    the feature scores, class fidelity (class-conditional models), energy distance, FID and
    IS wherever some row has them."""
    rows = [row for report in reports for row in report.rows]
    columns = ["sampler", "NFE"]
    columns += [
        f"{title} ± s.e." for key, title in FEATURE_COLUMNS.items() if any(key in r.scores for r in rows)
    ]
    if any(r.class_fidelity is not None for r in rows):
        columns.append("class fidelity ± s.e.")
    columns.append("energy distance ± s.e.")
    if any(r.fid is not None for r in rows):
        columns.append("FID")
    if any(r.inception_score is not None for r in rows):
        columns.append("IS")
    return columns


def row_cells(row: EvalRow, columns: list[str]) -> list[str]:
    """`row` under `columns` (see table_columns); "–" where it has no value."""
    by_title = {f"{title} ± s.e.": row.scores.get(key) for key, title in FEATURE_COLUMNS.items()}
    by_title["class fidelity ± s.e."] = row.class_fidelity
    cells = []
    for column in columns:
        if column == "sampler":
            floor = row.kind == "data"
            guided = f", guidance {row.guidance:g}" if row.guidance != 1.0 else ""
            cells.append("data vs data (floor)" if floor else row.method + guided)
        elif column == "NFE":
            cells.append("–" if row.kind == "data" else str(row.nfe))
        elif column == "energy distance ± s.e.":
            cells.append(format_estimate(row.energy_distance, row.stderr))
        elif column == "FID":
            cells.append(f"{row.fid:.3f}" if row.fid is not None else "–")
        elif column == "IS":
            cells.append(f"{row.inception_score:.2f}" if row.inception_score is not None else "–")
        else:
            estimate = by_title[column]
            cells.append(format_estimate(estimate.value, estimate.stderr) if estimate is not None else "–")
    return cells


METRIC_NAMES = {"energy_distance": "energy distance", "fd": "FD"}

METRIC_LABELS = {
    "energy_distance": "energy distance",
    "fd": "Fréchet distance (classifier features)",
    "kid": "KID (classifier features)",
}


def save_quality_plot(runs: list[tuple[str, EvalReport]], path: Path, title: str) -> None:
    """Quality vs NFE of one or several evaluations (named runs) in one PNG: one line per
    sampler family (per run), the first run's data-vs-data floor as a dashed line."""
    metric = runs[0][1].headline_metric
    curves = []
    for name, report in runs:
        curves += quality_curves(report, metric, prefix=f"{name}: " if len(runs) > 1 else "")
    floor = runs[0][1].noise_floor
    save_quality_vs_nfe(
        curves,
        path,
        ylabel=f"{METRIC_LABELS[metric]}, n={runs[0][1].n_samples}",
        title=title,
        floor=value_of(floor, metric) if floor else None,
    )


def describe_feature_net(net: FeatureNet) -> str:
    """What a report's feature scores were measured with, in one line."""
    return (
        f"{net.dataset} classifier, {net.dim}-D penultimate features, test accuracy "
        f"{net.test_accuracy:.2%}, weights sha256 {net.sha256[:12]}"
    )


def wants_features(cfg: EvalConfig, source: BatchSource) -> bool:
    """Whether samples are scored in a classifier's feature space: eval.features "on", or "auto"
    and labelled image data (a classifier can be trained on it)."""
    if cfg.features == "off":
        return False
    return cfg.features == "on" or (source.is_image and source.name not in NO_LABELS)


def feature_net_for(
    cfg: EvalConfig,
    source: BatchSource,
    data: DataConfig,
    device: torch.device,
    on_step: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> FeatureNet | None:
    """The feature network `source` is scored with (trained and cached on first use, reporting
    `on_step(step, steps, loss)`), None when not wanted (wants_features).  A dataset without one,
    or too few held-out samples for the metrics, is a MetricInputError, raised before training."""
    if not wants_features(cfg, source):
        return None
    available = len(source.held_out(cfg.n_samples))
    check_enough_samples(available, MIN_SAMPLES, cfg, source)  # the dimension-free minimum, first
    net = load_feature_net(data, device=device, on_step=on_step)
    check_enough_samples(available, required_samples(net.dim), cfg, source)
    return net


def check_enough_samples(available: int, needed: int, cfg: EvalConfig, source: BatchSource) -> None:
    if available >= needed:
        return
    split = f" (all of {source.name}'s held-out split)" if available < cfg.n_samples else ""
    raise MetricInputError(
        f"feature metrics need at least {needed} samples on each side, got {available}{split}: raise --n "
        "(eval.n_samples), or set eval.features=off to score by energy distance only"
    )


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


@torch.no_grad()
def in_batches(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    """fn over x in batches, concatenated on the CPU."""
    return torch.cat([fn(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])


@dataclass
class FeatureReference:
    """Held-out images in a feature network's space: what samples and the floor are scored against."""

    net: FeatureNet
    features: Tensor
    labels: Tensor | None  # of the held-out images, when class-conditional
    class_names: list[str]
    batch_size: int

    @classmethod
    def of(cls, net: FeatureNet, source: BatchSource, images: Tensor, labels: Tensor | None, batch_size: int):
        features = in_batches(net.features, images, batch_size)
        held_labels = labels.cpu() if labels is not None else None
        return cls(net, features, held_labels, list(source.class_names), batch_size)

    def score(self, row: EvalRow, images: Tensor, labels: Tensor | None) -> str | None:
        """Fill `row`'s feature scores (and, given the labels they were generated for, class
        fidelity and per-class FD) for `images`; returns why per-class FD was left out, if it was."""
        features = in_batches(self.net.features, images, self.batch_size)
        row.scores = score_features(self.features, features)
        if labels is None or self.labels is None:
            return None
        labels = labels.cpu()
        row.class_fidelity = class_fidelity(in_batches(self.net.logits, images, self.batch_size), labels)
        needed = max(2 * FD_JACKKNIFE_GROUPS, self.net.dim + 1)  # a jackknife and a full-rank covariance
        fewest = min(
            int(min((self.labels == k).sum(), (labels == k).sum())) for k in range(len(self.class_names))
        )
        if fewest < needed:
            return (
                f"per-class FD left out: it needs {needed} samples of each class on each side, the rarest "
                f"class has {fewest} (n = {len(labels)} over {len(self.class_names)} classes; raise --n)"
            )
        by_index = per_class_fd(self.features, self.labels, features, labels)
        row.per_class_fd = {self.class_names[k]: estimate for k, estimate in by_index.items()}
        return None

    def real_fidelity(self, images: Tensor) -> Estimate:
        """The class fidelity real images score: the feature net's accuracy on the held-out images
        (`images`, whose features these are) against their labels."""
        return class_fidelity(in_batches(self.net.logits, images, self.batch_size), self.labels)


HELD_OUT_FLIP_SEED, REFERENCE_FLIP_SEED = 1, 2  # fixed: every evaluation sees the same flips


def as_trained(source: BatchSource, images: Tensor, seed: int) -> Tensor:
    """Real images as training served them: with `data.hflip` each is mirrored with probability
    1/2 (from a fixed seed).  A model trained with flips learns that mixture, so unflipped
    references would charge it for the flips it was taught: for Fashion-MNIST, whose shoes all
    face one way, that alone costs more FD than most samplers' differences."""
    if not getattr(source, "hflip", False):
        return images
    return random_flip(images, torch.Generator().manual_seed(seed))


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
    feature_net: FeatureNet | None = None,
    guidances: list[float] | None = None,
) -> EvalReport:
    """Each method's samples (at each guidance scale, default the run's, all on the run's
    eval.guidance_interval) against `cfg.n_samples` held-out samples: energy distance, and the
    feature scores when `feature_net` is given.

    `on_progress` is called after each piece of work: a sampled batch, a metric.
    """
    device = next(model.parameters()).device
    methods = methods if methods is not None else default_methods(cfg, meanflow)
    guidances = guidances or [cfg.guidance]
    held_out, held_labels = source.held_out_labeled(cfg.n_samples)
    held_out = as_trained(source, held_out.float().cpu(), HELD_OUT_FLIP_SEED)
    n = held_out.shape[0]
    reference = None
    if feature_net is not None:
        reference = FeatureReference.of(feature_net, source, held_out, held_labels, cfg.batch_size)
    on_progress()
    noise, labels = draw_noise_and_labels(model, n, device, seed)
    report = EvalReport(
        n_samples=n, features=describe_feature_net(feature_net) if feature_net is not None else None
    )
    task = (
        progress.add_task("evaluating", total=len(methods) * len(guidances)) if progress is not None else None
    )
    with eval_mode(model):
        for method in methods:
            for guidance in guidances:
                samples = generate(
                    model,
                    method,
                    noise,
                    labels,
                    sampler_guidance(cfg, guidance),
                    cfg.batch_size,
                    on_batch=on_progress,
                )
                result = energy_distance(samples, held_out)
                row = EvalRow(
                    method.label, method.kind, method.steps, method.nfe, result.value, result.stderr, guidance
                )
                if reference is not None:
                    note = reference.score(row, samples, labels)
                    if note and note not in report.notes:
                        report.notes.append(note)
                on_progress()
                report.rows.append(row)
                if progress is not None:
                    progress.advance(task)
    if with_floor:
        real = as_trained(source, source.reference(n).float().cpu(), REFERENCE_FLIP_SEED)
        floor = energy_distance(real, held_out)
        report.noise_floor = EvalRow("data vs data", "data", 0, 0, floor.value, floor.stderr)
        if reference is not None:
            reference.score(report.noise_floor, real, None)
            if labels is not None and reference.labels is not None:  # beside the samples' fidelity
                report.noise_floor.class_fidelity = reference.real_fidelity(held_out)
        on_progress()
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
    reference = backend.reference.describe()
    return FidInfo(
        method=method.label,
        n_samples=n,
        reference=reference,
        value=value,
        guidance=as_guidance(guidance).scale,
    )
