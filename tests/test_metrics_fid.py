"""FID: the Fréchet formula against closed forms (always), the clean-fid wrapper (when installed)."""

import importlib.util
import urllib.error

import numpy as np
import pytest
import torch

from zoo.metrics import fid as zoo_fid
from zoo.metrics.fid import FidUnavailableError, compute_fid, feature_statistics, frechet_distance


def random_spd(d: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_diagonal_covariances_closed_form():
    """Commuting (diagonal) covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    a, b = torch.rand(6, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1
    truth = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(float(truth), rel=1e-5)


def test_one_dimensional_gaussians():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    value = frechet_distance(
        torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]])
    )
    assert value == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)


def test_general_covariances_match_scipy_sqrtm():
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(1)
    s1, s2 = random_spd(12, g), random_spd(12, g)
    mu1, mu2 = (
        torch.randn(12, generator=g, dtype=torch.float64),
        torch.randn(12, generator=g, dtype=torch.float64),
    )
    cross = sqrtm(s1.numpy() @ s2.numpy()).real
    truth = float((mu1 - mu2).square().sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * cross)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(truth, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_feature_statistics_and_sample_estimate():
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    features = torch.randn(20_000, 3, generator=g, dtype=torch.float64) * scale
    mu, cov = feature_statistics(features)
    assert np.allclose(cov.numpy(), np.cov(features.numpy(), rowvar=False))
    assert np.allclose(mu.numpy(), features.numpy().mean(0))
    shifted = features + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(mu, cov, *feature_statistics(shifted)) == pytest.approx(1.0, rel=1e-9)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_missing_clean_fid_is_explained(monkeypatch):
    monkeypatch.setattr(zoo_fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FidUnavailableError, match="pip install clean-fid"):
        compute_fid(lambda k: torch.zeros(k, 3, 32, 32), "cifar10", 32, "train", 10, "cpu", 5)


needs_cleanfid = pytest.mark.skipif(
    importlib.util.find_spec("cleanfid") is None,
    reason="clean-fid not installed (optional: pip install 'zoo[fid]'); the wrapper is untested here",
)


@needs_cleanfid
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::scipy.linalg.LinAlgWarning")
def test_wrapper_passes_everything_explicitly(monkeypatch):
    """Through clean-fid's real generator pipeline, with its two downloads replaced."""
    from cleanfid import fid as cleanfid_fid

    seen: dict = {}

    def fake_extractor(mode, device, use_dataparallel):
        seen["extractor"] = (mode, device, use_dataparallel)

        def features(batch: torch.Tensor) -> torch.Tensor:
            seen.setdefault("shapes", set()).add(tuple(batch.shape[1:]))
            seen["range"] = (float(batch.min()), float(batch.max()))
            return batch.float().mean(dim=(2, 3))  # 3 features: mean colour (singular for grey)

        return features

    def fake_reference(name, res, mode, model_name, seed, split):
        seen["reference"] = (name, res, mode, split)
        return np.full(3, 127.5), np.eye(3)

    monkeypatch.setattr(cleanfid_fid, "build_feature_extractor", fake_extractor)
    monkeypatch.setattr(cleanfid_fid, "get_reference_statistics", fake_reference)
    calls = []

    def generate(k: int) -> torch.Tensor:
        calls.append(k)
        return torch.rand(k, 1, 32, 32) * 2 - 1

    value = compute_fid(generate, "cifar10", 32, "train", n=10, device="cpu", batch_size=4)
    assert seen["reference"] == ("cifar10", 32, "clean", "train")
    assert seen["extractor"] == ("clean", torch.device("cpu"), False)
    assert seen["shapes"] == {(3, 299, 299)} and 0 <= seen["range"][0] and seen["range"][1] <= 255
    assert calls == [4, 4, 4]
    assert np.isfinite(value) and value > 0


@needs_cleanfid
def test_offline_download_failure_is_explained(monkeypatch):
    from cleanfid import fid as cleanfid_fid

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cleanfid_fid, "build_feature_extractor", offline)
    with pytest.raises(FidUnavailableError) as error:
        compute_fid(lambda k: torch.zeros(k, 3, 32, 32), "cifar10", 32, "train", 10, "cpu", 5)
    message = str(error.value)
    assert "inception-2015-12-05.pt" in message and "cifar10_clean_train_32.npz" in message
