"""FID: the Fréchet distance between Gaussians fitted to Inception features.

`frechet_distance` / `feature_statistics` are pure torch (float64) and testable offline.
The rest uses clean-fid (the optional `fid` extra, imported only when called): its Inception
network, its image resizing, and its precomputed reference statistics of real datasets.
Clean-fid's defaults are FFHQ / 1024 px / CUDA, so the dataset name, resolution, split and
device are always passed.  `load_fid_backend` fetches clean-fid's two files (the Inception
weights and the reference statistics) before anything is sampled; offline, that fails at once
as a `FidUnavailableError` saying which files to fetch and where to put them.
"""

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zoo.errors import FidUnavailableError, FidUnsupportedError
from zoo.network import guarded_download

INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
# clean-fid loads the Inception weights from this folder (its fixed choice on Linux and macOS).
INCEPTION_DIR = Path("/tmp")
STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"
# Seconds a silent network may stall a download before FID gives up (clean-fid sets none).
DOWNLOAD_TIMEOUT_S = 60.0
INSTALL_HINT = "FID needs clean-fid: `pip install clean-fid` (or `pip install -e '.[fid]'`)"


@dataclass(frozen=True)
class FidReference:
    """Clean-fid's precomputed statistics of one dataset at one resolution and split."""

    name: str
    resolution: int
    split: str

    @property
    def stats_file(self) -> str:
        return f"{self.name}_clean_{self.split}_{self.resolution}.npz".lower()

    def describe(self) -> str:
        return f"{self.name} {self.split} statistics at {self.resolution} px"


# zoo's datasets that clean-fid has reference statistics for: only CIFAR-10 (32 px; train, as the
# MeanFlow paper reports).  Clean-fid publishes none for Fashion-MNIST, the
# digits, zoo's CelebA crops or ImageNet; the 2-D sets are no images.
FID_REFERENCES = {"cifar10": FidReference("cifar10", 32, "train")}


def fid_reference(dataset: str) -> FidReference:
    if dataset not in FID_REFERENCES:
        raise FidUnsupportedError(
            "--fid needs clean-fid reference statistics, which exist for "
            f"{', '.join(sorted(FID_REFERENCES))} only, not for {dataset}; compare {dataset} models "
            "by the energy distance (zoo eval without --fid)"
        )
    return FID_REFERENCES[dataset]


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of features (n, d), in float64."""
    features = features.reshape(len(features), -1).to(torch.float64)
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    return features.mean(0), torch.cov(features.T)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for covariances S1, S2 (float64).

    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the square root of a symmetric PSD
    matrix, so an eigendecomposition gives it stably (no complex parts from sqrtm).
    """
    mu1, mu2, cov1, cov2 = (t.to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"shapes do not match: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
            f"covariances {tuple(cov1.shape)}, {tuple(cov2.shape)}"
        )
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)


def frechet_distance_of_features(features1: Tensor, features2: Tensor) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


@dataclass
class FidBackend:
    """What FID needs besides the generated images: the feature network and the reference statistics.

    `features` maps images (B, 3, 299, 299) in [0, 255] (clean-fid's resized input) to (B, d).
    """

    features: Callable[[Tensor], Tensor | np.ndarray]
    mu: np.ndarray
    sigma: np.ndarray
    reference: FidReference


def cleanfid_stats_dir() -> Path:
    spec = importlib.util.find_spec("cleanfid")
    return Path(spec.origin).parent / "stats"


def missing_files_message(reference: FidReference, reason: object) -> str:
    stats = reference.stats_file
    return (
        f"FID could not download clean-fid's files ({reason}). Offline, fetch them on a machine with "
        f"network and put them in place: {INCEPTION_URL} as {INCEPTION_DIR / 'inception-2015-12-05.pt'}, "
        f"and {STATS_URL}/{stats} as {cleanfid_stats_dir() / stats}"
    )


def load_fid_backend(reference: FidReference, device: torch.device | str) -> FidBackend:
    """Clean-fid's Inception network and `reference`'s statistics, downloaded now if missing.

    Called before any image is generated: offline, FID fails at once, not after 50k samples.
    """
    if importlib.util.find_spec("cleanfid") is None:
        raise FidUnavailableError(INSTALL_HINT)
    from cleanfid import fid as cleanfid_fid

    # clean-fid downloads without a timeout and leaves a cut-off file in place, which every later
    # run then fails to load: give its sockets a timeout, and remove what a failed download began.
    downloads = [INCEPTION_DIR / "inception-2015-12-05.pt", cleanfid_stats_dir() / reference.stats_file]
    absent = [path for path in downloads if not path.exists()]
    message = functools.partial(missing_files_message, reference)
    with guarded_download(absent, DOWNLOAD_TIMEOUT_S, FidUnavailableError, message):
        features = cleanfid_fid.build_feature_extractor("clean", torch.device(device), use_dataparallel=False)
        mu, sigma = cleanfid_fid.get_reference_statistics(
            reference.name,
            reference.resolution,
            mode="clean",
            model_name="inception_v3",
            seed=0,
            split=reference.split,
        )
    return FidBackend(features, np.asarray(mu), np.asarray(sigma), reference)


def to_pixels(images: Tensor) -> Tensor:
    """Images in [-1, 1] as 3-channel [0, 255] pixel values, rounded to integers: the reference
    statistics come from 8-bit images, so generated ones are quantised as a saved PNG would be."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def fid_of_generator(
    backend: FidBackend,
    generate_fn: Callable[[int], Tensor],
    n: int,
    batch_size: int,
    device: torch.device | str,
) -> float:
    """FID of `n` images from `generate_fn(k)` (k images (k, C, H, W) in [-1, 1]) against the
    backend's reference statistics, through clean-fid's resizing ("clean" mode)."""
    if n < 2:
        raise ValueError(f"FID needs at least 2 images for a covariance, got {n}")
    from cleanfid import fid as cleanfid_fid

    def generator(z: Tensor) -> Tensor:
        # clean-fid passes noise z (batch_size, z_dim) and expects exactly batch_size images in
        # [0, 255]; ours draws its own noise (model-shaped, from the evaluation's seed).
        return to_pixels(generate_fn(len(z)))

    # z_dim=1: clean-fid's noise is unused, so keep it tiny.  It rounds n up to whole batches and
    # keeps the first n feature rows.
    features = cleanfid_fid.get_model_features(
        generator,
        backend.features,
        mode="clean",
        z_dim=1,
        num_gen=n,
        batch_size=min(batch_size, n),
        device=torch.device(device),
        verbose=False,
    )
    mu, cov = feature_statistics(torch.as_tensor(features))
    return frechet_distance(mu, cov, torch.as_tensor(backend.mu), torch.as_tensor(backend.sigma))


def compute_fid(
    generate_fn: Callable[[int], Tensor],
    dataset_name: str,
    resolution: int,
    split: str,
    n: int,
    device: torch.device | str,
    batch_size: int,
) -> float:
    """FID of `n` generated images against clean-fid's reference statistics
    (e.g. "cifar10", 32, "train").  `generate_fn(k)` returns k images (k, C, H, W) in [-1, 1]."""
    backend = load_fid_backend(FidReference(dataset_name, resolution, split), device)
    return fid_of_generator(backend, generate_fn, n, batch_size, device)
