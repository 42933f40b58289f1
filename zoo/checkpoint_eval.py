"""`zoo eval`'s work on checkpoints: everything that can fail on bad input is checked when a
checkpoint's evaluation is prepared (before any sampling), then each is run and written as a JSON,
a picture of samples and a quality-vs-NFE plot beside it; several are put side by side.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.config.loading import ConfigError
from zoo.config.schema import DataConfig, EvalConfig
from zoo.data import BatchSource, build_data
from zoo.evaluation import (
    EvalReport,
    FidInfo,
    Method,
    default_methods,
    evaluate,
    evaluate_fid,
    feature_net_for,
    headline_method,
)
from zoo.inference import LoadedModel, load_model, resolve_run_guidance
from zoo.metrics import fid as clean_fid
from zoo.metrics import inception
from zoo.metrics.features import FeatureNet
from zoo.metrics.inception import default_stats_cache
from zoo.scoring import open_reference, reference_statistics, score_model
from zoo.solvers.samplers import Guidance, sampler_guidance


@dataclass
class EvalOutputs:
    """Where one evaluation is written: its JSON, a picture of samples and quality vs NFE."""

    json: Path

    @property
    def samples(self) -> Path:
        return self.json.with_suffix(".png")

    @property
    def quality(self) -> Path:
        return self.json.with_name(f"{self.json.stem}_quality.png")

    @classmethod
    def beside(cls, checkpoint: Path, seed: int) -> "EvalOutputs":
        return cls(checkpoint.with_name(f"eval_{checkpoint.stem}_seed{seed}.json"))


@dataclass
class CheckpointEval:
    """One checkpoint, ready to evaluate: its model, data, samplers and feature network."""

    checkpoint: Path
    loaded: LoadedModel
    source: BatchSource
    data: DataConfig  # the run's, with --data-dir applied
    eval_cfg: EvalConfig
    methods: list[Method]
    guidances: list[float]
    shown: Method  # the sampler of the picture (and of FID)
    feature_net: FeatureNet | None  # set by load_features

    def load_features(self, on_step: Callable[[int, int, float], None]) -> None:
        """The feature network of image data (trained on first use, reporting to `on_step`: the
        slow part of preparing, so it comes after every quicker check)."""
        self.feature_net = feature_net_for(self.eval_cfg, self.source, self.data, self.device, on_step)

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    @property
    def name(self) -> str:
        """The run's name, and the checkpoint's when it is not the run's last."""
        run = self.checkpoint.parent.name
        return run if self.checkpoint.stem == "last" else f"{run}/{self.checkpoint.stem}"

    def run(self, seed: int, progress=None) -> EvalReport:
        """Every sampler at every guidance scale; the picture and FID then use the shown
        sampler's best scale."""
        report = evaluate(
            self.loaded.model,
            self.source,
            self.eval_cfg,
            meanflow=self.loaded.is_meanflow,
            seed=seed,
            methods=self.methods,
            progress=progress,
            feature_net=self.feature_net,
            guidances=self.guidances,
        )
        best = report.best_guidance()[f"{self.shown.kind}_{self.shown.steps}"]
        self.eval_cfg = self.eval_cfg.model_copy(update={"guidance": best})
        return report

    @property
    def guidance(self) -> Guidance:
        """The guidance of the picture and of FID."""
        return sampler_guidance(self.eval_cfg)


def prepare(
    checkpoint: Path,
    device: torch.device,
    n: int | None = None,
    data_root: str | None = None,
    guidances: list[float] | None = None,
    shown_solver: str | None = None,
    shown_nfe: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> CheckpointEval:
    """Load `checkpoint` and its data (then `load_features`); bad input is a ConfigError, raised
    before any sampling.

    `shown_solver`/`shown_nfe` pick the sampler of the picture (default: the run's headline);
    `guidance_interval` (models conditioned on guidance) applies to every guidance scale."""
    loaded = load_model(checkpoint, device)
    cfg = loaded.cfg
    eval_cfg = cfg.eval.model_copy(update={"n_samples": n}) if n else cfg.eval
    try:
        shown = headline_method(eval_cfg, loaded.is_meanflow, shown_solver, shown_nfe)
    except ValueError as exc:
        raise ConfigError(f"--fid-solver/--fid-nfe: {exc}") from None
    if not loaded.model.num_classes and guidances not in (None, [1.0]):
        raise ConfigError(
            f"--guidance {', '.join(f'{g:g}' for g in guidances)} needs a class-conditional model; "
            "this one is unconditional (leave --guidance out)"
        )
    chosen = [resolve_run_guidance(loaded, g, guidance_interval) for g in guidances or [None]]
    guidances = [g.scale for g in chosen]
    eval_cfg = eval_cfg.model_copy(update={"guidance": guidances[0], "guidance_interval": chosen[0].interval})
    data_cfg = cfg.data.model_copy(update={"root": data_root}) if data_root else cfg.data
    source = build_data(data_cfg, device, cfg.seed, batch_size=eval_cfg.batch_size)
    methods = default_methods(eval_cfg, loaded.is_meanflow)
    if shown not in methods:
        methods.append(shown)  # the picture's (and FID's) sampler also gets its row
    return CheckpointEval(checkpoint, loaded, source, data_cfg, eval_cfg, methods, guidances, shown, None)


def check_comparable(evals: list[CheckpointEval]) -> None:
    """Checkpoints compared in one table must score the same data at the same n."""
    first = evals[0]
    for other in evals[1:]:
        if other.source.name != first.source.name or other.eval_cfg.n_samples != first.eval_cfg.n_samples:
            raise ConfigError(
                f"{other.checkpoint} evaluates {other.source.name} at n={other.eval_cfg.n_samples}, "
                f"{first.checkpoint} {first.source.name} at n={first.eval_cfg.n_samples}: compare runs "
                "of one dataset (pass --n to use one sample count)"
            )


def comparison_json(evals: list[CheckpointEval], seed: int, out: Path | None) -> Path:
    """Where several checkpoints' joint table goes: `out`, else beside the first run's folder."""
    if out is not None:
        return out
    names = "_vs_".join(e.name.replace("/", "-") for e in evals)
    return evals[0].checkpoint.parent.parent / f"compare_{names}_seed{seed}.json"


class FidScorer(ABC):
    """FID of a checkpoint's picture sampler, set up (and checked) before any sampling."""

    @abstractmethod
    def score(self, e: CheckpointEval, n: int, batch_size: int, seed: int, progress) -> FidInfo: ...


class CleanFid(FidScorer):
    """clean-fid's Inception and its reference statistics (CIFAR-10)."""

    def __init__(self, e: CheckpointEval) -> None:
        self.backend = clean_fid.load_fid_backend(clean_fid.fid_reference(e.loaded.cfg.data.name), e.device)

    def score(self, e: CheckpointEval, n: int, batch_size: int, seed: int, progress) -> FidInfo:
        task = progress.add_task(f"FID: {n} images, {e.shown.label}", total=-(-n // batch_size))
        return evaluate_fid(
            e.loaded.model,
            e.shown,
            self.backend,
            n,
            batch_size,
            e.guidance,
            seed=seed,
            on_batch=lambda: progress.advance(task),
        )


class ReferenceFid(FidScorer):
    """Inception features of (decoded) samples against reference statistics the user supplies:
    ADM's ImageNet batch, an .npz zoo wrote, or an image folder (statistics computed once)."""

    def __init__(self, e: CheckpointEval, ref: Path | None) -> None:
        if ref is None:
            raise ConfigError(
                "--fid on a latent model scores decoded images against statistics you supply: add --fid-ref "
                "VIRTUAL_imagenet256_labeled.npz (ADM's reference batch) or --fid-ref an image folder"
            )
        if e.source.is_latent and e.source.vae is None:
            raise ConfigError("FID needs decoded images, and this run sets data.decode_latents=false")
        if not (e.source.is_image or e.source.is_latent):
            raise ConfigError(
                "FID scores images; this model generates 2-D points (energy distance is its metric)"
            )
        self.ref = ref
        self.stats_cache = default_stats_cache()
        self.reference = open_reference(ref, None, self.stats_cache)
        self.extractor = inception.InceptionV3(e.device, self.reference.resize if self.reference else "clean")

    def score(self, e: CheckpointEval, n: int, batch_size: int, seed: int, progress) -> FidInfo:
        model = e.loaded.model
        latent = e.source.is_latent
        side = model.data_shape[-1] * (e.source.vae.downsample_factor if latent else 1)
        reference = reference_statistics(
            self.ref, self.reference, self.extractor, side, self.stats_cache, progress, batch_size=batch_size
        )
        task = progress.add_task(f"FID: {n} images, {e.shown.label}", total=n)
        scores = score_model(
            model,
            e.shown,
            e.guidance,
            self.extractor,
            reference,
            n=n,
            batch_size=batch_size,
            seed=seed,
            decode=e.source.decode if latent else None,
            decoded_by=e.source.vae_name if latent else None,
            on_batch=lambda k: progress.advance(task, k),
        )
        return FidInfo(scores.sampler, scores.n_samples, scores.reference, scores.fid)


def fid_scorer(e: CheckpointEval, ref: Path | None) -> FidScorer:
    """Against `ref` when given (any image or latent model), else clean-fid's statistics; latent
    models need a `ref`."""
    if ref is not None or e.source.is_latent:
        return ReferenceFid(e, ref)
    return CleanFid(e)
