"""Model construction, shapes, conditioning and parameter counts."""

import pytest
import torch
from model_helpers import perturb

from zoo.config.schema import DiTConfig, MLPConfig, UNetConfig
from zoo.models import MLP, UNet, build_model, count_parameters
from zoo.models.embeddings import MAX_PERIOD, TIME_SCALE, sinusoidal_embedding

TINY_MLP = MLPConfig(hidden=32, depth=2, time_embed_dim=16)


def tiny_unet(attention_res: list[int]) -> UNetConfig:
    return UNetConfig(
        channels=16,
        channel_mults=[1, 2, 2],
        blocks_per_res=1,
        attention_res=attention_res,
        dropout=0.1,
        num_groups=8,
        heads=2,
    )


TINY_DIT = DiTConfig(patch_size=2, hidden=32, depth=2, heads=2)

IMAGE_CASES = [
    # (data shape, config): 28x28 exercises odd resolutions (28 -> 14 -> 7 and back)
    ((1, 28, 28), tiny_unet([14, 7])),
    ((3, 32, 32), tiny_unet([16])),
    ((1, 8, 8), tiny_unet([4])),
    ((1, 28, 28), DiTConfig(patch_size=4, hidden=32, depth=2, heads=2)),
    ((3, 32, 32), TINY_DIT),
    ((1, 8, 8), TINY_DIT),
    ((4, 32, 32), DiTConfig(patch_size=4, hidden=32, depth=1, heads=4)),  # SD-VAE latents
]


def times(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.linspace(0.3, 0.9, batch)
    return t, 0.5 * t


@pytest.mark.parametrize("shape,cfg", IMAGE_CASES)
def test_image_models_output_shape_and_zero_init(shape, cfg):
    torch.manual_seed(0)
    model = build_model(cfg, shape, num_classes=0)
    z = torch.randn(3, *shape)
    out = model(z, *times(3))
    assert out.shape == z.shape
    # zero-initialised last layers: the untrained model predicts exactly zero velocity
    assert out.abs().max().item() == 0.0


@pytest.mark.parametrize("shape,cfg", [((2,), TINY_MLP)] + IMAGE_CASES[:2] + IMAGE_CASES[4:5])
def test_models_depend_on_t_on_r_and_on_z(shape, cfg):
    torch.manual_seed(0)
    model = build_model(cfg, shape).eval()
    perturb(model)
    z = torch.randn(4, *shape)
    t, r = times(4)
    base = model(z, t, r)
    assert torch.isfinite(base).all()
    for other in (model(z, t, r * 0.2), model(z, t + 0.05, r), model(z + 0.1, t, r)):
        assert (other - base).abs().max() > 1e-4 * base.abs().max()


@pytest.mark.parametrize("shape,cfg", [((2,), TINY_MLP), ((1, 8, 8), tiny_unet([4])), ((1, 8, 8), TINY_DIT)])
def test_class_conditional_models_use_the_label(shape, cfg):
    torch.manual_seed(0)
    model = build_model(cfg, shape, num_classes=5).eval()
    assert model.null_class == 5
    perturb(model)
    z = torch.randn(4, *shape)
    t, r = times(4)
    y = torch.tensor([0, 1, 2, 3])
    out = model(z, t, r, y)
    assert (model(z, t, r, (y + 1) % 5) - out).abs().amax(dim=tuple(range(1, out.ndim))).min() > 1e-5
    # y=None is the null ("no class") label
    null = torch.full((4,), 5)
    assert torch.equal(model(z, t, r, None), model(z, t, r, null))
    with pytest.raises(ValueError, match="unconditional"):
        build_model(cfg, shape)(z, t, r, y)


def test_mlp_default_is_small():
    model = build_model(MLPConfig(), (2,))
    assert isinstance(model, MLP)
    assert count_parameters(model) < 1_000_000
    assert model(torch.randn(5, 2), *times(5)).shape == (5, 2)


def test_paper_unet_has_the_cifar10_parameter_count():
    """EDM's DDPM++ (55.73M) plus a second time MLP for h = t - r; MeanFlow reports ~55.9M."""
    with torch.device("meta"):
        model = build_model(UNetConfig(), (3, 32, 32))
    assert isinstance(model, UNet)
    n = count_parameters(model)
    assert n == 56_061_443
    assert abs(n - 55.9e6) / 55.9e6 < 0.01
    interval = sum(p.numel() for p in model.time_embed.interval.parameters())
    assert n - interval == 55_732_739  # EDM's DDPM++ CIFAR-10 network


def test_build_model_rejects_mismatched_data():
    with pytest.raises(ValueError, match="vector data"):
        build_model(MLPConfig(), (1, 28, 28))
    with pytest.raises(ValueError, match="images"):
        build_model(UNetConfig(), (2,))
    with pytest.raises(ValueError, match="images"):
        build_model(TINY_DIT, (2,))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        build_model(DiTConfig(patch_size=4, hidden=32, depth=1, heads=2), (3, 30, 30))
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model(
            UNetConfig(channels=16, channel_mults=[1], attention_res=[], num_groups=8, heads=3),
            (1, 8, 8),
        )
    with pytest.raises(
        ValueError, match=r"lists \[16\], which is not among this U-Net's resolutions \[28, 14, 7\]"
    ):
        build_model(UNetConfig(channels=16, channel_mults=[1, 2, 2], num_groups=8), (1, 28, 28))


def test_sinusoidal_embedding_values_and_time_derivative():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    emb = sinusoidal_embedding(t, 128)
    assert emb.shape == (3, 128)
    assert torch.allclose(emb[0], torch.cat([torch.ones(64), torch.zeros(64)]).double())
    freqs = TIME_SCALE * MAX_PERIOD ** (-torch.arange(64, dtype=torch.float64) / 64)
    assert freqs[0] == TIME_SCALE  # the fastest channel turns TIME_SCALE radians per unit time
    angles = t[:, None] * freqs
    assert torch.allclose(emb, torch.cat([angles.cos(), angles.sin()], dim=1))
    # MeanFlow differentiates through it: d/dt [cos, sin] = w [-sin, cos]
    _, d_emb = torch.func.jvp(lambda s: sinusoidal_embedding(s, 128), (t,), (torch.ones_like(t),))
    assert torch.allclose(d_emb, torch.cat([-angles.sin(), angles.cos()], dim=1) * freqs.repeat(2))
    assert sinusoidal_embedding(t, 7).shape == (3, 7)
