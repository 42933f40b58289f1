"""Time and label embeddings shared by every zoo network.

A MeanFlow network sees two times, t and r.  Following the paper's U-Net and DiT it embeds t
and the interval h = t - r with separate sinusoid + MLP embedders and sums the two vectors
(`TimeIntervalEmbedding`); a flow-matching model is the special case r = t (h = 0).
"""

import math

import torch
from torch import Tensor, nn

# Times live in [0, 1] and are fed to the sinusoids unscaled.  The DDPM habit of scaling t by
# 1000 (frequencies up to 1000 rad per unit time) makes u very rough in t, and MeanFlow's target
# uses du/dt: on moons the 1-NFE energy distance grew with the scale and the raw MeanFlow loss
# with it (EXPERIMENT_LOG.md, "Time-embedding scale").  The learnt
# MLP after the sinusoids still resolves fine differences in t where the data needs them.
TIME_SCALE = 1.0
MAX_PERIOD = 10_000.0


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) times -> (B, dim) features [cos(w_i s t), sin(w_i s t)], w_i = MAX_PERIOD^(-i/half).

    Computed in t's dtype (fp64 in precision tests); an odd `dim` gets one zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=t.dtype) / half
    freqs = torch.exp(-math.log(MAX_PERIOD) * exponent)
    angles = (TIME_SCALE * t)[:, None] * freqs[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


class TimeEmbedding(nn.Module):
    """One scalar time per sample: sinusoid(freq_dim) -> Linear -> SiLU -> Linear(dim)."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class TimeIntervalEmbedding(nn.Module):
    """emb(t) + emb'(t - r): the two times of an average-velocity model, embedded separately."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.time = TimeEmbedding(dim, freq_dim)
        self.interval = TimeEmbedding(dim, freq_dim)

    def forward(self, t: Tensor, r: Tensor) -> Tensor:
        if t.ndim != 1 or r.shape != t.shape:
            raise ValueError(
                f"t and r must both have shape (batch,), got {tuple(t.shape)} and {tuple(r.shape)}"
            )
        return self.time(t) + self.interval(t - r)


class LabelEmbedding(nn.Module):
    """Class labels 0..num_classes-1 plus the null label `num_classes` (CFG, label dropout)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedding needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch: int) -> Tensor:
        """y=None means "no class" for every sample."""
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        return self.table(y)


def check_labels(num_classes: int, y: Tensor | None) -> None:
    """Labels given to an unconditional model are a configuration error, not something to ignore."""
    if num_classes == 0 and y is not None:
        raise ValueError(
            "this model is unconditional (num_classes=0) but labels were passed; build it with "
            "num_classes > 0 (data.class_conditional=true) or call it with y=None"
        )


def embed_conditions(
    time_embed: TimeIntervalEmbedding,
    label_embed: LabelEmbedding | None,
    t: Tensor,
    r: Tensor,
    y: Tensor | None,
    num_classes: int,
) -> Tensor:
    """The conditioning vector of every zoo network: emb(t) + emb'(t - r), plus the label's
    embedding for a class-conditional model (checked against `num_classes`)."""
    check_labels(num_classes, y)
    emb = time_embed(t, r)
    if label_embed is not None:
        emb = emb + label_embed(y, t.shape[0])
    return emb
