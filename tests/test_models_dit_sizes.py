"""Named DiT sizes (S, B, L, XL with patch 2, 4, 8): the config fields they set, and parameter
counts against a count written out by hand from the architecture, checked in turn against the
official DiT-XL/2's 675M."""

import pytest
import torch

from zoo.config.loading import ConfigError, load_config
from zoo.config.schema import DIT_PATCH_SIZES, DIT_SIZE_NAMES, DIT_SIZES, DiTConfig
from zoo.models import DiT, build_model, count_parameters

# The DiT paper, Table 1: layers, hidden size, heads.
PAPER_TABLE = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def dit_parameters(
    hidden: int,
    depth: int,
    patch: int,
    in_channels: int,
    out_channels: int,
    num_classes: int,
    time_embedders: int,
    trainable_positions: int = 0,
    freq_dim: int = 256,
    mlp_ratio: int = 4,
) -> int:
    """Parameters of a DiT, counted layer by layer (weights + biases)."""
    h, m = hidden, hidden * mlp_ratio
    patch_embed = patch * patch * in_channels * h + h  # a p x p convolution with stride p
    time_embed = time_embedders * (freq_dim * h + h + h * h + h)  # sinusoid -> Linear -> SiLU -> Linear
    labels = (num_classes + 1) * h if num_classes else 0  # one row per class plus the null class
    attention = (h * 3 * h + 3 * h) + (h * h + h)  # qkv and output projection
    mlp = (h * m + m) + (m * h + h)
    modulation = h * 6 * h + 6 * h  # adaLN: shift, scale, gate for attention and MLP
    block = attention + mlp + modulation  # the layer norms have no affine parameters
    out = patch * patch * out_channels
    final = (h * 2 * h + 2 * h) + (h * out + out)  # adaLN shift/scale, then the linear to patches
    return patch_embed + time_embed + labels + depth * block + final + trainable_positions


def test_the_count_reproduces_the_official_dit_xl_2():
    """facebookresearch/DiT's DiT-XL/2 at 256 px (32x32x4 latents), 1000 classes: it learns the
    variance too (8 output channels), has one time embedder, and keeps its fixed 256 x 1152
    position table as a (frozen) parameter; its README reports 675M parameters."""
    count = dit_parameters(1152, 28, 2, 4, 8, 1000, time_embedders=1, trainable_positions=256 * 1152)
    assert count == 675_129_632
    assert round(count / 1e6) == 675


def test_sizes_are_the_papers():
    assert {name: (d, h, k) for name, (h, d, k) in DIT_SIZES.items()} == PAPER_TABLE
    assert DIT_SIZE_NAMES == tuple(f"{name}/{p}" for name in PAPER_TABLE for p in (2, 4, 8))
    assert DIT_PATCH_SIZES == (2, 4, 8)


@pytest.mark.parametrize("size", DIT_SIZE_NAMES)
def test_each_size_builds_the_papers_shape_with_the_counted_parameters(size):
    """zoo's DiT: 4 output channels (no learnt variance), t and t - r embedded separately, a
    fixed (buffer) position table; on the meta device, so XL costs no memory."""
    depth, hidden, heads = PAPER_TABLE[size.split("/")[0]]
    patch = int(size.split("/")[1])
    cfg = DiTConfig(size=size)
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.patch_size) == (hidden, depth, heads, patch)
    with torch.device("meta"):
        model = build_model(cfg, (4, 32, 32), num_classes=1000)
    assert isinstance(model, DiT)
    assert model.grid == (32 // patch, 32 // patch) and len(model.blocks) == depth
    assert model.blocks[0].attn.heads == heads
    expected = dit_parameters(hidden, depth, patch, 4, 4, 1000, time_embedders=2)
    assert count_parameters(model) == expected


def test_a_size_contradicted_by_an_explicit_field_is_refused():
    assert DiTConfig(size="L/4", depth=24).depth == 24  # agreeing is fine
    with pytest.raises(ValueError, match="model.size=B/2 means hidden=768, but hidden=512"):
        DiTConfig(size="B/2", hidden=512)
    with pytest.raises(ValueError, match="'XL/8'"):
        DiTConfig(size="M/3")


def test_presets_and_overrides_name_sizes():
    assert load_config("imagenet-latents").model.size == "B/4"
    cfg = load_config("imagenet-latents", ["model.size=XL/2"])
    assert (cfg.model.hidden, cfg.model.depth, cfg.model.heads, cfg.model.patch_size) == (1152, 28, 16, 2)
    with pytest.raises(ConfigError, match="model.size=XL/2 means depth=28, but depth=6"):
        load_config("imagenet-latents", ["model.size=XL/2", "model.depth=6"])
