"""Time and label embeddings shared by every zoo network.

A MeanFlow network sees two times, t and r.  Following the paper's U-Net and DiT it embeds t
and the interval h = t - r with separate sinusoid + MLP embedders and sums the two vectors
(`TimeIntervalEmbedding`); a flow-matching model is the special case r = t (h = 0).  The model
option `time_inputs` chooses t and r instead, or h alone (iMF's: the noise level is then read from z).

An iMF model may also be conditioned on the guidance it should produce (`GuidanceInputs`): the
scale omega, embedded as 1 - 1/omega in [0, 1), and the interval [t_min, t_max] of times where it
applies, each embedded like a time (`GuidanceEmbedding`).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoo.config.schema import NetworkConditioning

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
    """The two times of an average-velocity model, embedded separately and summed.

    inputs "t_h": emb(t) + emb'(t - r);  "t_r": emb(t) + emb'(r);  "h": emb'(t - r) alone.
    The second embedder is `interval` in every case (its weights keep one name in checkpoints).
    """

    def __init__(self, dim: int, freq_dim: int, inputs: str = "t_h") -> None:
        super().__init__()
        if inputs not in ("t_h", "t_r", "h"):
            raise ValueError(f"unknown time inputs {inputs!r}; use 't_h', 't_r' or 'h'")
        self.inputs = inputs
        self.time = TimeEmbedding(dim, freq_dim) if inputs != "h" else None
        self.interval = TimeEmbedding(dim, freq_dim)

    def forward(self, t: Tensor, r: Tensor) -> Tensor:
        if t.ndim != 1 or r.shape != t.shape:
            raise ValueError(
                f"t and r must both have shape (batch,), got {tuple(t.shape)} and {tuple(r.shape)}"
            )
        second = self.interval(r if self.inputs == "t_r" else t - r)
        return second if self.time is None else self.time(t) + second

    def embedders(self) -> list[TimeEmbedding]:
        return [e for e in (self.time, self.interval) if e is not None]


@dataclass
class GuidanceInputs:
    """Per-sample guidance an iMF model is asked for: scale omega >= 1 on times in [t_min, t_max]."""

    omega: Tensor  # (B,)
    t_min: Tensor  # (B,)
    t_max: Tensor  # (B,)

    @classmethod
    def constant(
        cls, batch: int, omega: float, interval: tuple[float, float], device: torch.device, dtype: torch.dtype
    ) -> "GuidanceInputs":
        def full(value: float) -> Tensor:
            return torch.full((batch,), value, device=device, dtype=dtype)

        return cls(omega=full(omega), t_min=full(interval[0]), t_max=full(interval[1]))

    def at(self, t: Tensor) -> "GuidanceInputs":
        """The inputs of the velocity at t (r = t): omega where t lies in the row's interval, else
        1, over the whole interval [0, 1], as r = t rows are trained (the interval of a velocity
        at one time only says whether guidance acts there)."""
        acts = (t >= self.t_min) & (t <= self.t_max)
        return GuidanceInputs(
            omega=torch.where(acts, self.omega, torch.ones_like(self.omega)),
            t_min=torch.zeros_like(self.t_min),
            t_max=torch.ones_like(self.t_max),
        )

    def rows(self, index: Tensor | slice) -> "GuidanceInputs":
        return GuidanceInputs(self.omega[index], self.t_min[index], self.t_max[index])

    def cat(self, other: "GuidanceInputs") -> "GuidanceInputs":
        return GuidanceInputs(
            torch.cat([self.omega, other.omega]),
            torch.cat([self.t_min, other.t_min]),
            torch.cat([self.t_max, other.t_max]),
        )


class GuidanceEmbedding(nn.Module):
    """emb(1 - 1/omega) + emb'(t_min) + emb''(t_max); every input lies in [0, 1] like a time."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.scale = TimeEmbedding(dim, freq_dim)
        self.t_min = TimeEmbedding(dim, freq_dim)
        self.t_max = TimeEmbedding(dim, freq_dim)

    def forward(self, guidance: GuidanceInputs) -> Tensor:
        return self.scale(1 - 1 / guidance.omega) + self.t_min(guidance.t_min) + self.t_max(guidance.t_max)

    def embedders(self) -> list[TimeEmbedding]:
        return [self.scale, self.t_min, self.t_max]


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
    guidance_embed: GuidanceEmbedding | None = None,
    guidance: GuidanceInputs | None = None,
) -> Tensor:
    """The conditioning vector of every zoo network: the times' embedding, plus the label's for a
    class-conditional model (checked against `num_classes`), plus the guidance's for a model
    conditioned on it (no guidance given: omega = 1 everywhere, i.e. none)."""
    check_labels(num_classes, y)
    emb = time_embed(t, r)
    if label_embed is not None:
        emb = emb + label_embed(y, t.shape[0])
    if guidance_embed is None:
        if guidance is not None:
            raise ValueError(
                "guidance inputs were passed to a model not conditioned on them; build it with "
                "model.guidance_inputs=true, or sample it with classifier-free guidance"
            )
        return emb
    if guidance is None:
        guidance = GuidanceInputs.constant(t.shape[0], 1.0, (0.0, 1.0), t.device, t.dtype)
    return emb + guidance_embed(guidance)


def time_and_guidance_embeddings(
    cfg: NetworkConditioning, dim: int, freq_dim: int, num_classes: int
) -> tuple[TimeIntervalEmbedding, GuidanceEmbedding | None]:
    """A network's time embedding (cfg.time_inputs) and, with cfg.guidance_inputs, its guidance
    embedding, which only a class-conditional model can use (guidance contrasts a class with none)."""
    if cfg.guidance_inputs and num_classes == 0:
        raise ValueError(
            "model.guidance_inputs=true needs a class-conditional model (guidance contrasts a class with "
            "no class); set data.class_conditional=true or model.guidance_inputs=false"
        )
    guidance = GuidanceEmbedding(dim, freq_dim) if cfg.guidance_inputs else None
    return TimeIntervalEmbedding(dim, freq_dim, cfg.time_inputs), guidance
