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

iMF's auxiliary velocity head (model.v_head = k): the last k decoder blocks (all at the input
resolution, each fed its encoder skip) and the output layer are duplicated; everything before them
is shared.  The output is formed at full resolution by those blocks, so the copy gives the v-head
its own full-resolution processing of every shared multi-scale feature at the cost of k of the
cheaper (narrowest) blocks, where copying the decoder would nearly double the network.

Resampling handles any size: 2x2 average pooling with ceil_mode (7 -> 4 keeps the border
pixels) and nearest-neighbour upsampling to the size of the matching skip (4 -> 7), so 28x28
Fashion-MNIST works with three or four resolutions.

GroupNorm, convolutions and attention come from zoo.models.layers (fast exact JVPs); with them
the forward also runs on zoo.models.dual's Duals, carrying row tangents (jvp="fused").
"""

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.config.schema import UNetConfig
from zoo.models.base import RowTangentModel
from zoo.models.dual import Value
from zoo.models.embeddings import (
    GuidanceInputs,
    LabelEmbedding,
    embed_conditions,
    time_and_guidance_embeddings,
)
from zoo.models.layers import Attention, Conv2d, Dropout, GroupNorm, Linear, SiLU

Resample = Literal["none", "down", "up"]

# Residual sums are scaled by sqrt(1/2) so that a block's output variance stays that of its
# input (two roughly independent unit-variance terms), as in DDPM++/EDM.
SKIP_SCALE = math.sqrt(0.5)
NORM_EPS = 1e-6
EMB_MULT = 4  # embedding width = EMB_MULT * channels (EDM's channel_mult_emb)


def resample(x: Value, mode: Resample, size: tuple[int, int] | None) -> Value:
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    if mode == "up":
        return F.interpolate(x, size=size, mode="nearest")
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
        self.act = SiLU()
        self.norm0 = GroupNorm(num_groups, in_channels, eps=NORM_EPS)
        self.conv0 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = Linear(emb_dim, out_channels)
        self.norm1 = GroupNorm(num_groups, out_channels, eps=NORM_EPS)
        self.dropout = Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, padding=1)
        # A zero last layer makes every block start as its skip path: the network begins as a
        # well-conditioned near-identity stack whose output is exactly 0 (a sane first
        # prediction for a velocity of zero-mean data), and depth does not blow up the
        # activations; the zero weights still receive gradients at once.
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        needs_projection = in_channels != out_channels or resample != "none"
        self.skip = Conv2d(in_channels, out_channels, 1) if needs_projection else nn.Identity()
        if attention:
            self.norm2 = GroupNorm(num_groups, out_channels, eps=NORM_EPS)
            self.attn = Attention(out_channels, heads)
            nn.init.zeros_(self.attn.proj.weight)
            nn.init.zeros_(self.attn.proj.bias)
        else:
            self.attn = None

    def forward(self, x: Value, emb: Value, size: tuple[int, int] | None = None) -> Value:
        h = resample(self.act(self.norm0(x)), self.resample, size)
        h = self.conv0(h) + self.emb(emb).unsqueeze(-1).unsqueeze(-1)
        h = self.conv1(self.dropout(self.act(self.norm1(h))))
        x = (h + self.skip(resample(x, self.resample, size))) * SKIP_SCALE
        if self.attn is not None:
            a = self.attn(self.norm2(x).flatten(2).transpose(1, 2))  # over the (B, H*W, C) pixels
            x = (x + a.transpose(1, 2).reshape(x.shape)) * SKIP_SCALE
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
        self.time_embed, self.guidance_embed = time_and_guidance_embeddings(
            cfg, emb_dim, cfg.channels, num_classes
        )
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
        self.act = SiLU()
        self.conv_out = Conv2d(width, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # output exactly 0 at init (see ResBlock)
        nn.init.zeros_(self.conv_out.bias)
        self.shared = len(self.decoder) - cfg.v_head  # decoder blocks before the heads split
        if cfg.v_head:
            self.v_decoder = copy.deepcopy(self.decoder[self.shared :])
            self.v_norm_out = copy.deepcopy(self.norm_out)
            self.v_conv_out = copy.deepcopy(self.conv_out)

    @property
    def has_v_head(self) -> bool:
        return self.shared < len(self.decoder)

    def condition(
        self, t: Tensor, r: Tensor, y: Tensor | None, guidance: GuidanceInputs | None = None
    ) -> Tensor:
        emb = embed_conditions(
            self.time_embed, self.label_embed, t, r, y, self.num_classes, self.guidance_embed, guidance
        )
        return F.silu(emb)

    def decode(self, blocks: list[ResBlock], x: Value, skips: list[Value], emb: Value) -> Value:
        """Run decoder blocks, popping the skips they take from `skips` (in place)."""
        for block in blocks:
            if block.resample == "up":
                x = block(x, emb, size=skips[-1].shape[-2:])
            else:
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return x

    def trunk(self, z: Value, emb: Value) -> tuple[Value, list[Value]]:
        x = self.conv_in(z)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block in self.middle:
            x = block(x, emb)
        return self.decode(list(self.decoder[: self.shared]), x, skips, emb), skips

    def head(self, features: tuple[Value, list[Value]], emb: Value, name: str) -> Value:
        x, skips = features
        if name == "u":
            blocks, norm, conv = list(self.decoder[self.shared :]), self.norm_out, self.conv_out
        else:
            blocks, norm, conv = list(self.v_decoder), self.v_norm_out, self.v_conv_out
        x = self.decode(blocks, x, list(skips), emb)  # a copy: each head pops the same skips
        return conv(self.act(norm(x)))
