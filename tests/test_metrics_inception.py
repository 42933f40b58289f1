"""FID/IS machinery for ImageNet-style scoring: the Inception Score and the streamed statistics
against closed forms, FID of streamed batches against the direct formula, reference files (ADM's
layout, zoo's cache), and `zoo fid`'s refusals before any work."""

import io
import math

import numpy as np
import pytest
import torch
from latent_helpers import TinyFeatures
from typer.testing import CliRunner

from zoo.errors import MissingAssetError
from zoo.metrics import inception
from zoo.metrics.fid import feature_statistics, frechet_distance_of_features, to_pixels
from zoo.metrics.inception import (
    INCEPTION_NAME,
    ReferenceStats,
    RunningStatistics,
    check_compatible,
    fetch_inception,
    load_reference,
    score_images,
    split_inception_score,
)
from zoo.scoring import balanced_labels
from zoo_cli.main import app


def test_inception_score_closed_forms():
    assert split_inception_score(torch.full((6, 10), 0.1)) == pytest.approx(1.0)  # no information
    assert split_inception_score(torch.eye(7)) == pytest.approx(7.0)  # sure of 7 different classes
    a = 0.8  # two images, [a, 1-a] and [1-a, a]: the marginal is uniform
    kl = a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))
    assert split_inception_score(torch.tensor([[a, 1 - a], [1 - a, a]])) == pytest.approx(math.exp(kl))


class OneHotByBrightness(TinyFeatures):
    """Class k for an image whose pixels are all k (0..9): a score with a known answer."""

    def __call__(self, pixels):
        features, _ = super().__call__(pixels)
        return features, torch.nn.functional.one_hot(pixels[:, 0, 0, 0].long(), 10).float()


def test_the_score_averages_splits_as_adms_evaluator():
    images = torch.arange(10.0).repeat_interleave(3 * 36).reshape(10, 3, 6, 6) / 127.5 - 1  # pixels k
    features = OneHotByBrightness()
    reference_features = TinyFeatures()(to_pixels(torch.rand(20, 3, 6, 6) * 2 - 1))[0]
    mu, sigma = feature_statistics(reference_features)
    reference = ReferenceStats(mu.numpy(), sigma.numpy(), "random", features.name, features.resize, 20)
    one_split = score_images([images[:4], images[4:]], features, reference, split_size=10)
    assert one_split.inception_score == pytest.approx(10.0) and one_split.inception_score_std == 0
    five_each = score_images([images[:3], images[3:7], images[7:]], features, reference, split_size=5)
    assert five_each.inception_score == pytest.approx(5.0) and five_each.n == 10
    uneven = score_images([images], features, reference, split_size=4)  # splits of 4, 4, 2
    assert uneven.inception_score == pytest.approx((4 + 4 + 2) / 3)
    assert uneven.inception_score_std == pytest.approx(np.std([4, 4, 2]))


def test_streamed_statistics_and_fid_match_the_direct_formulas():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 5, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 2, 3, 4, 5], dtype=torch.float64
    )
    running = RunningStatistics()
    for chunk in rows.split(37):
        running.add(chunk)
    mu, cov = running.mean_and_covariance()
    assert np.allclose(mu, rows.mean(0)) and np.allclose(cov, np.cov(rows.numpy(), rowvar=False))

    features = TinyFeatures()
    generated = torch.rand(40, 3, 12, 12, generator=g) * 2 - 1
    real = torch.rand(50, 3, 12, 12, generator=g) * 1.6 - 0.8
    real_features = features(to_pixels(real))[0]
    mu, sigma = feature_statistics(real_features)
    reference = ReferenceStats(mu.numpy(), sigma.numpy(), "real", features.name, features.resize, 50)
    scores = score_images(generated.split(16), features, reference)
    direct = frechet_distance_of_features(features(to_pixels(generated))[0], real_features)
    assert scores.fid == pytest.approx(direct, rel=1e-9) and scores.fid > 0
    assert score_images(real.split(7), features, reference).fid == pytest.approx(0.0, abs=1e-9)


def test_balanced_labels():
    labels = balanced_labels(50_000, 1000, torch.Generator().manual_seed(0))
    assert torch.bincount(labels).tolist() == [50] * 1000
    assert len(set(labels[:5000].tolist())) > 990  # shuffled: an IS split sees (nearly) every class


def test_reference_files(tmp_path):
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2))
    reference = load_reference(adm)
    assert (reference.extractor, reference.resize, reference.count) == (INCEPTION_NAME, "tf", None)
    assert "ADM reference batch" in reference.description
    with pytest.raises(ValueError, match="FID compares only features computed the same way"):
        check_compatible(reference, TinyFeatures())
    with pytest.raises(MissingAssetError, match="openaipublic.*VIRTUAL_imagenet256_labeled.npz"):
        load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", arr_0=np.zeros(3))
    with pytest.raises(MissingAssetError, match="not the arrays mu and sigma"):
        load_reference(tmp_path / "other.npz")
    np.save(tmp_path / "mu.npy", np.zeros(3))
    (tmp_path / "cut.npz").write_bytes(adm.read_bytes()[:100])
    for path in (tmp_path / "mu.npy", tmp_path / "cut.npz"):
        with pytest.raises(MissingAssetError, match="is not an .npz file"):
            load_reference(path)


class CutOff(io.BytesIO):
    """A response whose connection is reset after its first bytes."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell():
            raise ConnectionResetError("connection reset by peer")
        return super().read(4)


@pytest.fixture
def offline_inception(tmp_path, monkeypatch):
    """Inception's weights not on this machine, and a download cut off half-way.  urlopen is
    patched, not clean-fid's functions: clean-fid star-imports those into its other modules, where
    a patch would outlive the test."""
    import cleanfid.downloads_helper as helper

    monkeypatch.setattr(inception, "INCEPTION_DIR", tmp_path)
    monkeypatch.setattr(inception, "INCEPTION_FILE", tmp_path / "inception-2015-12-05.pt")
    monkeypatch.setattr(
        helper.urllib.request, "urlopen", lambda url, *args, **kwargs: CutOff(b"PK\x03\x04...")
    )
    return tmp_path / "inception-2015-12-05.pt"


def test_missing_inception_weights_are_explained_and_no_partial_file_stays(offline_inception):
    with pytest.raises(MissingAssetError, match=f"connection reset.*put it at {offline_inception}"):
        fetch_inception()
    assert not offline_inception.exists()


def test_zoo_fid_refuses_before_reading_the_checkpoint(tmp_path, offline_inception):
    runner = CliRunner()
    checkpoint = tmp_path / "no-such-run" / "last.pt"
    result = runner.invoke(
        app, ["fid", str(checkpoint), "--ref", str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")]
    )
    assert (
        result.exit_code == 2 and "ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz" in result.output
    )
    np.savez(tmp_path / "adm.npz", mu=np.zeros(3), sigma=np.eye(3))
    result = runner.invoke(
        app, ["fid", str(checkpoint), "--ref", str(tmp_path / "adm.npz"), "--device", "cpu"]
    )
    assert (
        result.exit_code == 2
        and "nvlabs-fi-cdn" in result.output
        and "inception-2015-12-05.pt" in result.output
    )
    result = runner.invoke(
        app, ["fid", str(checkpoint), "--ref", str(tmp_path / "adm.npz"), "--resize", "clean"]
    )
    assert result.exit_code == 2 and "computed with resize=tf" in result.output


def test_inception_runs_in_full_fp32_whatever_the_training_precision():
    """The reference statistics were computed with IEEE fp32 convolutions; zoo trains with TF32 on
    CUDA, so scoring switches TF32 off for the network and restores the caller's setting."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, no_output_bias=False):
            seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return torch.zeros(len(x), 4)

    extractor = object.__new__(inception.InceptionV3)
    extractor.device, extractor.resize = torch.device("cpu"), "tf"
    extractor.network = Recorder()
    extractor.network.base = extractor.network
    before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        extractor(torch.zeros(2, 3, 8, 8))
        after = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
    assert seen == [("ieee", "ieee"), ("ieee", "ieee")]
    assert after == ("tf32", "tf32")
