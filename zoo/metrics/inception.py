"""FID and Inception Score as ImageNet papers report them, with a pluggable feature network.

FID compares Gaussians fitted to pool features of generated images with reference statistics
(mu, sigma) of real ones; the Inception Score is exp(E_x KL(p(y|x) || p(y))) from the same
network's class probabilities, averaged over splits of 5000 images (ADM's evaluator, whose
numbers MeanFlow, iMF and DiT report).

Reference statistics come from
- the ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`, arrays `mu`, `sigma`): computed by
  TensorFlow's Inception graph, which resizes its input to 299 px inside (bilinear, TF's
  alignment); zoo's features for it resize the same way ("tf"), or
- an image folder (class folders or flat), computed once by zoo (centre crop + resize to the
  generated images' size, as training data) and cached in an .npz that records how ("clean":
  clean-fid's PIL-bicubic resize to 299; or "tf").

The feature network is a `FeatureExtractor`: clean-fid's TorchScript port of TF Inception
(2015-12-05) here, a small network in tests.  Everything streams: running sums of the
features (float64) and one IS split of probabilities at a time, never 50 000 images at once.
"""

import hashlib
import importlib.util
import io
import json
import math
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from zoo.data.encode import list_images
from zoo.data.sources import CenterCropResize, ImageFiles
from zoo.devices import cuda_fp32_precision
from zoo.errors import FidUnavailableError, MissingAssetError
from zoo.metrics.fid import (
    DOWNLOAD_TIMEOUT_S,
    INCEPTION_DIR,
    INCEPTION_URL,
    INSTALL_HINT,
    frechet_distance,
    to_pixels,
)
from zoo.network import guarded_download
from zoo.output_paths import zoo_cache_dir
from zoo.runs import atomic_write_bytes

Resize = Literal["clean", "tf"]
RESIZES: tuple[str, ...] = ("clean", "tf")
INCEPTION_NAME = "inception-v3-tf-2015-12-05"
IS_SPLIT_SIZE = 5000  # ADM's evaluator: the Inception Score of each 5000 images, then the mean
INCEPTION_FILE = INCEPTION_DIR / "inception-2015-12-05.pt"
ADM_REFERENCE = "VIRTUAL_imagenet256_labeled.npz"
ADM_REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/" + ADM_REFERENCE
)


class FeatureExtractor(ABC):
    """Images as [0, 255] pixel values (B, 3, H, W), float -> (pool features (B, d), class
    probabilities (B, k)), both float on the CPU.

    `name` and `resize` identify the features: reference statistics are only comparable with
    features of the same network fed the same way."""

    name: str
    resize: str

    @abstractmethod
    def __call__(self, pixels: Tensor) -> tuple[Tensor, Tensor]: ...


def inception_missing_message(reason: object) -> str:
    return (
        f"the Inception network's weights are missing ({reason}). Fetch {INCEPTION_URL} on a machine with "
        f"network and put it at {INCEPTION_FILE} (clean-fid's fixed place for it)"
    )


class InceptionV3(FeatureExtractor):
    """TF Inception (2015-12-05) as clean-fid's TorchScript port: 2048 pool features, 1008 class
    probabilities (softmax without the output bias, as the TF graph's IS and ADM compute them).

    resize="clean" resizes each image to 299 px with clean-fid's PIL bicubic (on the CPU);
    resize="tf" hands the native size to the network, which resizes like TF's graph did."""

    def __init__(self, device: torch.device | str, resize: Resize) -> None:
        if importlib.util.find_spec("cleanfid") is None:
            raise FidUnavailableError(INSTALL_HINT)
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        fetch_inception()
        self.device = torch.device(device)
        self.resize = resize
        self.name = INCEPTION_NAME
        self.network = InceptionV3W(str(INCEPTION_DIR), download=False, resize_inside=resize == "tf").to(
            self.device
        )
        self.network.eval()
        self._resize_one = build_resizer("clean")

    @torch.no_grad()
    def __call__(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        if self.resize == "clean":
            images = pixels.permute(0, 2, 3, 1).cpu().numpy()
            pixels = torch.from_numpy(np.stack([self._resize_one(x) for x in images]).transpose(0, 3, 1, 2))
        pixels = pixels.to(self.device, torch.float32)
        # Full fp32 convolutions, as the reference statistics were computed: TF32 (zoo's training
        # default on CUDA) would shift the features.
        with cuda_fp32_precision("ieee"):
            features = self.network(pixels)
            probabilities = self.network.base(pixels, no_output_bias=True)
        return features.float().cpu(), probabilities.float().cpu()


def fetch_inception() -> None:
    """clean-fid's download of the Inception weights, when missing, with a timeout; offline, a
    MissingAssetError at once and no cut-off file left behind."""
    if INCEPTION_FILE.is_file():
        return
    from cleanfid.downloads_helper import check_download_inception

    with guarded_download([INCEPTION_FILE], DOWNLOAD_TIMEOUT_S, MissingAssetError, inception_missing_message):
        check_download_inception(str(INCEPTION_DIR))


class RunningStatistics:
    """Mean and unbiased covariance of feature rows added batch by batch (float64 sums)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, features: Tensor) -> None:
        x = features.reshape(len(features), -1).to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def mean_and_covariance(self) -> tuple[Tensor, Tensor]:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu, cov


def split_inception_score(probabilities: Tensor) -> float:
    """exp(mean over images of KL(p(y|x) || p(y))), p(y) the mean of these images' p(y|x)."""
    p = probabilities.to(torch.float64)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(1)
    return math.exp(float(kl.mean()))


@dataclass
class ReferenceStats:
    """mu, sigma of real images' features, and how they were computed."""

    mu: np.ndarray
    sigma: np.ndarray
    description: str
    extractor: str
    resize: str
    count: int | None  # images behind the statistics (not recorded in ADM's file)

    def to_meta(self) -> dict:
        return {
            "description": self.description,
            "extractor": self.extractor,
            "resize": self.resize,
            "count": self.count,
        }


def load_reference(path: Path) -> ReferenceStats:
    """An .npz with arrays `mu` and `sigma`: zoo's cache (which records how it was computed), or
    ADM's reference batch (TF Inception, resized inside the network)."""
    if not path.is_file():
        raise MissingAssetError(
            f"no reference statistics at {path}. For ImageNet 256 fetch ADM's reference batch "
            f"{ADM_REFERENCE_URL} and pass its path (--ref), or pass your ImageNet train folder (its "
            "statistics are computed once and cached)"
        )
    if not zipfile.is_zipfile(path):
        raise MissingAssetError(
            f"{path} is not an .npz file (or is cut off); pass ADM's {ADM_REFERENCE}, an .npz of statistics "
            "zoo wrote, or an image folder"
        )
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise MissingAssetError(
                f"{path} holds {', '.join(data.files)}, not the arrays mu and sigma of reference statistics; "
                f"pass ADM's {ADM_REFERENCE} or an image folder"
            )
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        meta = json.loads(str(data["zoo_meta"])) if "zoo_meta" in data.files else None
    if meta is None:  # ADM's evaluator: TF's Inception graph on 256 px images, resized inside
        return ReferenceStats(mu, sigma, f"{path.name} (ADM reference batch)", INCEPTION_NAME, "tf", None)
    return ReferenceStats(mu, sigma, meta["description"], meta["extractor"], meta["resize"], meta["count"])


def check_compatible(reference: ReferenceStats, extractor: FeatureExtractor) -> None:
    if (reference.extractor, reference.resize) != (extractor.name, extractor.resize):
        raise ValueError(
            f"the reference statistics ({reference.description}) are features of {reference.extractor} with "
            f"resize={reference.resize}, these of {extractor.name} with resize={extractor.resize}: "
            "FID compares only features computed the same way"
        )


def default_stats_cache() -> Path | None:
    """$ZOO_CACHE_DIR/fid-stats (default ~/.cache/zoo/fid-stats): folder statistics, computed once;
    None where no cache folder can be written (see zoo_cache_dir)."""
    root = zoo_cache_dir()
    return root / "fid-stats" if root is not None else None


def reference_cache_path(
    cache_dir: Path, images_key: str, image_size: int, extractor: FeatureExtractor
) -> Path:
    key = hashlib.sha256(
        f"{images_key}|{image_size}|{extractor.name}|{extractor.resize}".encode()
    ).hexdigest()
    return cache_dir / f"{image_size}px-{extractor.resize}-{key[:16]}.npz"


def folder_reference(
    folder: Path,
    extractor: FeatureExtractor,
    image_size: int,
    cache_dir: Path | None,
    *,
    batch_size: int = 100,
    num_workers: int = 0,
    limit: int | None = None,
    on_start: Callable[[int, bool], None] = lambda total, cached: None,
    on_items: Callable[[int], None] = lambda k: None,
) -> ReferenceStats:
    """Statistics of `folder`'s images (centre crop, resized to `image_size`), computed once and
    cached under `cache_dir` (keyed by the file list, size and extractor; None: not cached).
    `on_start(images, cached)` says whether they come from the cache; `on_items(k)` after each batch."""
    images = list_images(folder, limit)
    path = None
    if cache_dir is not None:
        key = f"{folder.resolve()}|{images.fingerprint()}"
        path = reference_cache_path(cache_dir, key, image_size, extractor)
    on_start(len(images.files), path is not None and path.is_file())
    if path is not None and path.is_file():
        return load_reference(path)
    dataset = ImageFiles(images.files, images.labels, CenterCropResize(image_size))
    statistics = RunningStatistics()
    for batch, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        statistics.add(extractor(batch.float())[0])
        on_items(len(batch))
    mu, sigma = statistics.mean_and_covariance()
    description = f"{folder} ({statistics.count} images at {image_size} px)"
    reference = ReferenceStats(
        mu.numpy(), sigma.numpy(), description, extractor.name, extractor.resize, statistics.count
    )
    if path is not None:
        buffer = io.BytesIO()
        meta = np.array(json.dumps(reference.to_meta()))
        np.savez(buffer, mu=reference.mu, sigma=reference.sigma, zoo_meta=meta)
        atomic_write_bytes(path, buffer.getvalue())
    return reference


@dataclass
class FeatureScores:
    fid: float
    inception_score: float
    inception_score_std: float  # across the IS splits (0 with one split)
    n: int


def score_images(
    batches: Iterable[Tensor],
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    split_size: int = IS_SPLIT_SIZE,
) -> FeatureScores:
    """FID against `reference` and the Inception Score of images in [-1, 1] (B, C, H, W), given
    batch by batch; quantised to 8 bits first, as a saved PNG would be."""
    check_compatible(reference, extractor)
    statistics = RunningStatistics()
    pending: list[Tensor] = []
    scores: list[float] = []
    for images in batches:
        features, probabilities = extractor(to_pixels(images))
        statistics.add(features)
        pending.append(probabilities)
        held = torch.cat(pending)
        while len(held) >= split_size:
            scores.append(split_inception_score(held[:split_size]))
            held = held[split_size:]
        pending = [held]
    rest = torch.cat(pending)
    if len(rest):  # the last, shorter split (ADM's evaluator scores it too)
        scores.append(split_inception_score(rest))
    mu, sigma = statistics.mean_and_covariance()
    fid = frechet_distance(mu, sigma, torch.as_tensor(reference.mu), torch.as_tensor(reference.sigma))
    return FeatureScores(fid, float(np.mean(scores)), float(np.std(scores)), statistics.count)
