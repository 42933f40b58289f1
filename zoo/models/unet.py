"""The DDPM++ / EDM-style U-Net (the MeanFlow paper's CIFAR-10 network at the default config).

Layout (as EDM's `SongUNet` with the DDPM++ settings):
  encoder  conv3x3 -> per resolution: [down-block] + `blocks_per_res` res-blocks
  middle   res-block with attention + res-block at the lowest resolution
  decoder  per resolution: [up-block] + (blocks_per_res + 1) res-blocks, each fed the
           concatenated skip of one encoder output; attention in the last block of each
           resolution listed in `attention_res`
  output   GroupNorm -> SiLU -> conv3x3
A res-block is GN -> SiLU -> conv3x3 -> (+ projected embedding) -> GN -> SiLU -> dropout ->
conv3x3, plus a skip (1x1 conv when the width or the resolution changes), scaled by sqrt(1/2);
with attention it adds GN -> multi-head self-attention -> projection, again scaled.

Resampling handles any size: 2x2 average pooling with ceil_mode (7 -> 4 keeps the border
pixels) and nearest-neighbour upsampling to the size of the matching skip (4 -> 7), so 28x28
Fashion-MNIST works with three or four resolutions.

GroupNorm, convolutions and attention come from zoo.models.layers (fast exact JVPs); the
forward is written in zoo.models.dual ops so that it can also carry row tangents (jvp="fused").
"""

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from zoo.config.schema import UNetConfig
from zoo.models import dual as D
from zoo.models.base import RowTangentModel
from zoo.models.embeddings import LabelEmbedding, TimeIntervalEmbedding, embed_conditions
from zoo.models.layers import Attention, Conv2d, GroupNorm

Resample = Literal["none", "down", "up"]

# Residual sums are scaled by sqrt(1/2) so that a block's output variance stays that of its
# input (two roughly independent unit-variance terms), as in DDPM++/EDM.
SKIP_SCALE = math.sqrt(0.5)
NORM_EPS = 1e-6
EMB_MULT = 4  # embedding width = EMB_MULT * channels (EDM's channel_mult_emb)


def _resample(x: D.Value, mode: Resample, size: tuple[int, int] | None) -> D.Value:
    if mode == "down":
        return D.lift(lambda a: F.avg_pool2d(a, kernel_size=2, stride=2, ceil_mode=True), x)
    if mode == "up":
        return D.lift(lambda a: F.interpolate(a, size=size, mode="nearest"), x)
    return x


class ResBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        num_groups: int,
        resample: Resample = "none",
        attention: bool = False,
        heads: int = 1,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.norm0 = GroupNorm(num_groups, in_channels, eps=NORM_EPS)
        self.conv0 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm1 = GroupNorm(num_groups, out_channels, eps=NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, padding=1)
        # A zero last layer makes every block start as its skip path: the network begins as a
        # well-conditioned near-identity stack whose output is exactly 0 (a sane first
        # prediction for a velocity of zero-mean data), and depth does not blow up the
        # activations; the zero weights still receive gradients at once.
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.needs_projection = in_channels != out_channels or resample != "none"
        self.skip = Conv2d(in_channels, out_channels, 1) if self.needs_projection else nn.Identity()
        if attention:
            self.norm2 = GroupNorm(num_groups, out_channels, eps=NORM_EPS)
            self.attn = Attention(out_channels, heads)
            nn.init.zeros_(self.attn.proj.weight)
            nn.init.zeros_(self.attn.proj.bias)
        else:
            self.attn = None

    def forward(self, x: D.Value, emb: D.Value, size: tuple[int, int] | None = None) -> D.Value:
        h = _resample(D.silu(D.group_norm(self.norm0, x)), self.resample, size)
        h = D.add(D.conv2d(self.conv0, h), D.lift(lambda e: e[:, :, None, None], D.linear(self.emb, emb)))
        h = D.conv2d(self.conv1, D.dropout(self.dropout, D.silu(D.group_norm(self.norm1, h))))
        skip = _resample(x, self.resample, size)
        if self.needs_projection:
            skip = D.conv2d(self.skip, skip)
        x = D.scale(D.add(h, skip), SKIP_SCALE)
        if self.attn is not None:
            height, width = D.primal(x).shape[-2:]
            tokens = D.lift(lambda a: a.flatten(2).transpose(1, 2), D.group_norm(self.norm2, x))
            a = D.multi_head_attention(self.attn, tokens)
            a = D.lift(lambda a_: a_.transpose(1, 2).reshape(a_.shape[0], -1, height, width), a)
            x = D.scale(D.add(x, a), SKIP_SCALE)
        return x


class UNet(RowTangentModel):
    """u(z, t, r, y) on images (C, H, W)."""

    def __init__(self, cfg: UNetConfig, data_shape: tuple[int, ...], num_classes: int = 0) -> None:
        super().__init__(data_shape, num_classes)
        if len(self.data_shape) != 3:
            raise ValueError(
                f"UNet models images of shape (channels, height, width), got data_shape="
                f"{self.data_shape}; use model.arch='mlp' for vector data"
            )
        in_channels, height, _ = self.data_shape
        emb_dim = EMB_MULT * cfg.channels
        block = dict(emb_dim=emb_dim, dropout=cfg.dropout, num_groups=cfg.num_groups, heads=cfg.heads)
        self.time_embed = TimeIntervalEmbedding(emb_dim, freq_dim=cfg.channels)
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes else None

        # Spatial size per level; the first level is the input resolution.
        sizes = [height]
        for _ in cfg.channel_mults[1:]:
            sizes.append(math.ceil(sizes[-1] / 2))
        unknown = sorted(set(cfg.attention_res) - set(sizes))
        if unknown:
            raise ValueError(
                f"attention_res {cfg.attention_res} lists {unknown}, which is not among this "
                f"U-Net's resolutions {sizes} (input {height}x{self.data_shape[2]}, "
                f"{len(sizes)} levels); choose from those, or [] for attention only in the middle"
            )
        attend = [size in cfg.attention_res for size in sizes]

        self.conv_in = Conv2d(in_channels, cfg.channels, 3, padding=1)
        self.encoder = nn.ModuleList()
        skip_widths = [cfg.channels]
        width = cfg.channels
        for level, mult in enumerate(cfg.channel_mults):
            if level > 0:
                self.encoder.append(ResBlock(width, width, resample="down", **block))
                skip_widths.append(width)
            for _ in range(cfg.blocks_per_res):
                self.encoder.append(ResBlock(width, cfg.channels * mult, attention=attend[level], **block))
                width = cfg.channels * mult
                skip_widths.append(width)

        self.middle = nn.ModuleList(
            [ResBlock(width, width, attention=True, **block), ResBlock(width, width, **block)]
        )

        # Decoder blocks in order; up-blocks take no skip, every other block takes one.
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mults))):
            if level < len(cfg.channel_mults) - 1:
                self.decoder.append(ResBlock(width, width, resample="up", **block))
            out_width = cfg.channels * cfg.channel_mults[level]
            for index in range(cfg.blocks_per_res + 1):
                last = index == cfg.blocks_per_res
                self.decoder.append(
                    ResBlock(
                        width + skip_widths.pop(),
                        out_width,
                        attention=last and attend[level],
                        **block,
                    )
                )
                width = out_width

        self.norm_out = GroupNorm(cfg.num_groups, width, eps=NORM_EPS)
        self.conv_out = Conv2d(width, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # output exactly 0 at init (see ResBlock)
        nn.init.zeros_(self.conv_out.bias)

    def condition(self, t: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
        return F.silu(embed_conditions(self.time_embed, self.label_embed, t, r, y, self.num_classes))

    def body(self, z: D.Value, emb: D.Value) -> D.Value:
        x = D.conv2d(self.conv_in, z)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block in self.middle:
            x = block(x, emb)
        for block in self.decoder:
            if block.resample == "up":
                x = block(x, emb, size=D.primal(skips[-1]).shape[-2:])
            else:
                x = block(D.cat([x, skips.pop()], dim=1), emb)
        return D.conv2d(self.conv_out, D.silu(D.group_norm(self.norm_out, x)))
