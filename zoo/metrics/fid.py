"""FID: the Fréchet distance between Gaussians fitted to Inception features.

`frechet_distance` / `feature_statistics` are pure torch (float64) and testable offline.
`compute_fid` wraps clean-fid (the optional `fid` extra, imported only when called): generated
images against clean-fid's precomputed reference statistics.  Clean-fid's defaults are
FFHQ / 1024 px / CUDA, so the dataset name, resolution, split and device are always passed.
Offline, clean-fid fails on its first download (Inception weights or reference statistics); that
becomes a `FidUnavailableError` saying which files to fetch and where to put them.
"""

import importlib.util
import urllib.error
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# clean-fid loads the Inception weights from this folder (its fixed choice on Linux and macOS).
INCEPTION_DIR = Path("/tmp")
STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"


class FidUnavailableError(RuntimeError):
    """FID cannot be computed here: clean-fid is missing or its files cannot be downloaded."""


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
    if importlib.util.find_spec("cleanfid") is None:
        raise FidUnavailableError("FID needs clean-fid: `pip install clean-fid` (or the zoo[fid] extra)")
    from cleanfid import fid as cleanfid_fid

    def generator(z: Tensor) -> Tensor:
        # clean-fid passes its own noise z of shape (batch_size, z_dim) and expects exactly
        # batch_size images in [0, 255]; our generator draws its own noise from the count.
        images = generate_fn(len(z)).clamp(-1, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images + 1) * 127.5

    try:
        return float(
            cleanfid_fid.compute_fid(
                gen=generator,
                dataset_name=dataset_name,
                dataset_res=resolution,
                dataset_split=split,
                mode="clean",
                num_gen=n,
                batch_size=batch_size,
                device=torch.device(device),
                use_dataparallel=False,
                verbose=False,
            )
        )
    except urllib.error.URLError as error:
        stats_file = f"{dataset_name}_clean_{split}_{resolution}.npz".lower()
        stats_dir = Path(cleanfid_fid.__file__).parent / "stats"
        raise FidUnavailableError(
            f"FID could not download its files ({error.reason}). Offline, put them in place first: "
            f"the Inception weights {INCEPTION_URL} as {INCEPTION_DIR / 'inception-2015-12-05.pt'}, "
            f"and the reference statistics {STATS_URL}/{stats_file} as {stats_dir / stats_file}."
        ) from error
