"""SDVAE wrapper, offline: a tiny random AutoencoderKL and the missing-weights error."""

import sys

import pytest
import torch

from zoo.errors import MissingAssetError, MissingDependencyError
from zoo.models.vae import SDVAE, TINY_VAE_CONFIG, decode_latents


@pytest.fixture(scope="module")
def vae() -> SDVAE:
    torch.manual_seed(0)
    return SDVAE.from_config(TINY_VAE_CONFIG)


def test_encode_decode_shapes_and_scaling(vae):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert vae.latent_shape((3, 32, 32)) == (4, 16, 16)
    mean = vae.encode(x, sample=False)
    assert mean.shape == (2, 4, 16, 16)
    raw = vae.autoencoder.encode(x).latent_dist.mean
    assert torch.allclose(mean, raw * 0.18215)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample = vae.encode(x, generator=g1)
    assert torch.equal(sample, vae.encode(x, generator=g2))
    assert not torch.equal(sample, mean)
    images = vae.decode(mean)
    assert images.shape == x.shape
    assert torch.allclose(images, vae.autoencoder.decode(raw).sample, atol=1e-5)
    assert not any(p.requires_grad for p in vae.parameters())


def test_latent_shape_rejects_sizes_the_vae_cannot_downsample(vae):
    with pytest.raises(ValueError, match="not divisible"):
        vae.latent_shape((3, 31, 31))


def test_explicit_noise_is_the_posterior_draw(vae):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.autoencoder.encode(x).latent_dist
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = (posterior.mean + posterior.std * noise) * vae.scale
    assert torch.allclose(vae.encode(x, noise=noise), expected)
    assert torch.allclose(vae.encode(x, noise=torch.zeros_like(noise)), vae.encode(x, sample=False))


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(MissingAssetError, match="no folder .*Fetch it on a machine with network"):
        SDVAE.from_pretrained(tmp_path / "sd-vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingAssetError, match="holds no config.json"):
        SDVAE.from_pretrained(tmp_path / "empty")


def test_decode_latents_batches_and_clamps(vae):
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 20
    images = decode_latents(vae, z, batch_size=2)
    assert images.shape == (5, 3, 16, 16) and images.abs().max() <= 1
    assert torch.allclose(images, vae.decode(z).clamp(-1, 1), atol=1e-5)


def test_a_missing_diffusers_is_a_user_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    for build in (lambda: SDVAE.from_config(TINY_VAE_CONFIG), lambda: SDVAE.from_pretrained("owner/vae")):
        with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[vae\]'"):
            build()
