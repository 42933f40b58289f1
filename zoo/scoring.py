"""FID and Inception Score of a model's samples, as ImageNet-256 papers report them.

50 000 samples by default; a class-conditional model draws the same number of each class
(ImageNet: 50 per class), in a seeded random order so that every Inception Score split of 5000
sees all classes as random labels would.  Latent models' samples are decoded by their VAE
before scoring.  The result names the sampler, its NFE and the guidance scale, the reference
and the feature network, so that a number is never separated from how it was measured.
"""

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from zoo.config.loading import ConfigError
from zoo.evaluation import Method, eval_mode, generate, no_progress
from zoo.metrics.inception import (
    FeatureExtractor,
    ReferenceStats,
    check_compatible,
    folder_reference,
    load_reference,
    score_images,
)
from zoo.models.base import FlowModel
from zoo.output_paths import check_writable_dir
from zoo.solvers.samplers import Guidance, as_guidance

DEFAULT_N = 50_000


@dataclass
class ImageScores:
    fid: float
    inception_score: float
    inception_score_std: float  # across IS splits of 5000 images
    n_samples: int
    class_balanced: bool
    sampler: str  # e.g. "MeanFlow 1-step"
    nfe: int
    guidance: float
    reference: str
    features: str  # the network and how images reach it
    decoded_by: str | None  # the VAE of a latent model
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        decoded = f", decoded by {self.decoded_by}" if self.decoded_by else ""
        balanced = " class-balanced" if self.class_balanced else ""
        return (
            f"FID {self.fid:.3f}, IS {self.inception_score:.2f} ± {self.inception_score_std:.2f} "
            f"({self.sampler}, {self.nfe} NFE, guidance {self.guidance:g}; {self.n_samples}{balanced} samples"
            f"{decoded}; vs {self.reference}; {self.features})"
        )


def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """n labels, each class n // num_classes or one more times, in a random order."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]


def score_model(
    model: FlowModel,
    method: Method,
    guidance: "float | Guidance",
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    *,
    n: int = DEFAULT_N,
    batch_size: int,
    seed: int = 0,
    decode: Callable[[Tensor], Tensor] | None = None,
    decoded_by: str | None = None,
    on_batch: Callable[[int], None] = lambda k: None,
) -> ImageScores:
    """FID and IS of `n` samples of `method` against `reference`, generated `batch_size` at a
    time (`decode` maps a latent model's samples to images in [-1, 1]); `on_batch(k)` after each
    batch of k images is scored."""
    check_compatible(reference, extractor)  # before any sample is drawn
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    labels = balanced_labels(n, model.num_classes, generator) if model.num_classes else None

    def batches() -> Iterator[Tensor]:
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            noise = torch.randn((k, *model.data_shape), generator=generator).to(device)
            y = labels[start : start + k].to(device) if labels is not None else None
            samples = generate(model, method, noise, y, guidance, batch_size, on_batch=no_progress)
            yield decode(samples) if decode is not None else samples
            on_batch(k)

    with eval_mode(model):
        scores = score_images(batches(), extractor, reference)
    return ImageScores(
        fid=scores.fid,
        inception_score=scores.inception_score,
        inception_score_std=scores.inception_score_std,
        n_samples=scores.n,
        class_balanced=labels is not None,
        sampler=method.label,
        nfe=method.nfe,
        guidance=as_guidance(guidance).scale,
        reference=reference.description,
        features=f"{extractor.name}, resize {extractor.resize}",
        decoded_by=decoded_by,
        seed=seed,
    )


def open_reference(ref: Path, resize: str | None, stats_cache: Path | None) -> ReferenceStats | None:
    """`ref`'s statistics when it is a file (read and checked now), or None for an image folder,
    whose statistics `reference_statistics` computes later and caches under `stats_cache`
    (checked writable now: for ImageNet they are an hour's work; None: not cached)."""
    if ref.is_dir():
        if stats_cache is not None:
            check_writable_dir(stats_cache, "--stats-cache")
        return None
    reference = load_reference(ref)  # a missing or wrong file: what to fetch and where
    if resize not in (None, reference.resize):
        raise ConfigError(f"--resize {resize}: {ref} was computed with resize={reference.resize}")
    return reference


def reference_statistics(
    ref: Path,
    reference: ReferenceStats | None,
    extractor: FeatureExtractor,
    image_size: int,
    stats_cache: Path | None,
    progress,
    *,
    batch_size: int,
    num_workers: int = 0,
    limit: int | None = None,
) -> ReferenceStats:
    """`reference` (from open_reference), or the statistics of the image folder `ref` at
    `image_size` px, from the cache or computed now with a bar on the rich `progress`."""
    if reference is not None:
        return reference
    task = progress.add_task("reference statistics", total=None)

    def started(total: int, cached: bool) -> None:
        progress.update(task, total=total, completed=total if cached else 0)

    return folder_reference(
        ref,
        extractor,
        image_size,
        stats_cache,
        batch_size=batch_size,
        num_workers=num_workers,
        limit=limit,
        on_start=started,
        on_items=lambda k: progress.advance(task, k),
    )
