"""The real pretrained assets, when this machine has them: the SD-VAE through `from_pretrained`,
clean-fid's Inception weights and ADM's ImageNet-256 reference batch.  Never downloaded here; each
test is skipped, saying what to fetch, unless the asset is found:

- ZOO_TEST_ASSETS=/path holding any of sd-vae-ft-ema/ (`huggingface-cli download
  stabilityai/sd-vae-ft-ema --local-dir /path/sd-vae-ft-ema`), inception-2015-12-05.pt and
  VIRTUAL_imagenet256_labeled.npz;
- or the SD-VAE in the Hugging Face cache, the Inception weights at clean-fid's place.

The images are the two photographs scikit-learn ships (china.jpg, flower.jpg), real data offline."""

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch import Tensor

from zoo.metrics import inception
from zoo.metrics.fid import frechet_distance
from zoo.models.vae import DEFAULT_SD_VAE, SDVAE

ASSETS = Path(os.environ["ZOO_TEST_ASSETS"]) if os.environ.get("ZOO_TEST_ASSETS") else None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HOW = "set ZOO_TEST_ASSETS to a folder holding it to run this test"
# An SD-VAE reconstructs 256 px natural images at about 25-30 dB PSNR; random weights give < 10.
MIN_VAE_PSNR_DB = 22.0


def photographs() -> list[np.ndarray]:
    """china.jpg and flower.jpg: (427, 640, 3) uint8 each."""
    return load_sample_images().images


def centre_crop(image: np.ndarray, side: int) -> Tensor:
    """The centre square, bicubic to `side` px, as (3, side, side) floats in [-1, 1]."""
    height, width = image.shape[:2]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    square = Image.fromarray(image[top : top + short, left : left + short]).resize(
        (side, side), Image.BICUBIC
    )
    return torch.from_numpy(np.asarray(square).transpose(2, 0, 1).copy()).float() / 127.5 - 1


def sd_vae_source() -> str:
    if ASSETS is not None and (ASSETS / "sd-vae-ft-ema" / "config.json").is_file():
        return str(ASSETS / "sd-vae-ft-ema")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_SD_VAE, "config.json"), str):
        return DEFAULT_SD_VAE
    pytest.skip(f"no SD-VAE here: neither $ZOO_TEST_ASSETS/sd-vae-ft-ema nor {DEFAULT_SD_VAE} cached; {HOW}")


@pytest.fixture
def inception_weights(monkeypatch) -> None:
    """clean-fid's Inception weights at their place, or from ZOO_TEST_ASSETS (read there)."""
    if importlib.util.find_spec("cleanfid") is None:
        pytest.skip("clean-fid is not installed (pip install -e '.[all]')")
    if inception.INCEPTION_FILE.is_file():
        return
    if ASSETS is not None and (ASSETS / inception.INCEPTION_FILE.name).is_file():
        monkeypatch.setattr(inception, "INCEPTION_DIR", ASSETS)
        monkeypatch.setattr(inception, "INCEPTION_FILE", ASSETS / inception.INCEPTION_FILE.name)
        return
    pytest.skip(
        f"no {inception.INCEPTION_FILE.name} at {inception.INCEPTION_FILE} or in $ZOO_TEST_ASSETS; {HOW}"
    )


def test_the_sd_vae_reconstructs_a_photograph():
    vae = SDVAE.from_pretrained(sd_vae_source()).to(DEVICE)
    assert vae.downsample_factor == 8 and vae.latent_channels == 4 and vae.scale == pytest.approx(0.18215)
    image = centre_crop(photographs()[0], 256)[None].to(DEVICE)
    latents = vae.encode(image, sample=False)
    assert latents.shape == (1, 4, 32, 32)
    assert 0.3 < latents.std().item() < 3.0  # the scale makes SD latents roughly unit variance
    decoded = vae.decode(latents).clamp(-1, 1)
    mse = ((decoded - image) ** 2).mean().item() / 4  # [-1, 1] -> [0, 1]
    psnr = 10 * math.log10(1 / mse)
    assert psnr > MIN_VAE_PSNR_DB, f"SD-VAE round trip of china.jpg at 256 px: {psnr:.1f} dB"


def test_inception_features_of_photographs(inception_weights):
    extractor = inception.InceptionV3(DEVICE, "clean")
    china, flower = (torch.from_numpy(x.transpose(2, 0, 1).copy()).float() for x in photographs())
    features, probabilities = extractor(torch.stack([china, china.flip(-1), flower]))
    assert features.shape == (3, 2048) and probabilities.shape == (3, 1008)
    assert torch.isfinite(features).all() and (features >= 0).all()  # pooled after a ReLU
    assert torch.allclose(probabilities.sum(1), torch.ones(3), atol=1e-4)
    # A mirrored photograph stays near itself in Inception's space; another photograph does not.
    assert (features[0] - features[1]).norm() < 0.5 * (features[0] - features[2]).norm()


def test_adm_reference_batch():
    path = ASSETS / inception.ADM_REFERENCE if ASSETS is not None else None
    if path is None or not path.is_file():
        pytest.skip(
            f"no $ZOO_TEST_ASSETS/{inception.ADM_REFERENCE} (fetch {inception.ADM_REFERENCE_URL}); {HOW}"
        )
    reference = inception.load_reference(path)
    assert reference.mu.shape == (2048,) and reference.sigma.shape == (2048, 2048)
    assert np.allclose(reference.sigma, reference.sigma.T) and (np.diag(reference.sigma) >= 0).all()
    assert (reference.extractor, reference.resize) == (inception.INCEPTION_NAME, "tf")
    mu, sigma = torch.from_numpy(reference.mu), torch.from_numpy(reference.sigma)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3 * sigma.trace().item() / 2048
    shifted = frechet_distance(mu + 1, sigma, mu, sigma)  # ||1||^2 = 2048 added, the traces cancel
    assert shifted == pytest.approx(2048, abs=1.0)
