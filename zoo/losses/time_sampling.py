"""Drawing training times t (and r <= t for MeanFlow) from the run's torch.Generator.

Every draw uses the generator handed in by the loss, on the generator's device, so training
noise and times are reproducible from the run seed and never come from dataset workers.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from zoo.config.schema import LossConfig


class TimeSampler(ABC):
    """Draws n times in (0, 1) on the generator's device."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor: ...


class LogitNormalSampler(TimeSampler):
    """t = sigmoid(n), n ~ N(mu, sigma^2): mu < 0 puts more mass near the data end (t = 0)."""

    def __init__(self, mu: float, sigma: float) -> None:
        if sigma <= 0:
            raise ValueError(f"logit-normal sigma must be positive, got {sigma}")
        self.mu = mu
        self.sigma = sigma

    def sample(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        normal = torch.randn(n, generator=generator, device=generator.device, dtype=dtype)
        return torch.sigmoid(normal * self.sigma + self.mu)


class UniformSampler(TimeSampler):
    def sample(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.rand(n, generator=generator, device=generator.device, dtype=dtype)


def build_time_sampler(cfg: LossConfig) -> TimeSampler:
    if cfg.time_sampler == "logit_normal":
        return LogitNormalSampler(cfg.time_mu, cfg.time_sigma)
    if cfg.time_sampler == "uniform":
        return UniformSampler()
    raise ValueError(f"unknown time sampler {cfg.time_sampler!r}; use 'logit_normal' or 'uniform'")


@dataclass
class TimePair:
    """Times of one MeanFlow batch.

    t, r: (B,) with r <= t.  mask: (B,) bool, True where r was kept apart from t (the samples
    whose target has a JVP term).  jvp_index / flow_index: the positions of the mask's True /
    False entries as long tensors, taken from the same permutation so no device sync
    (`mask.nonzero()`) is needed to split the batch; len(jvp_index) = n_jvp exactly.
    """

    t: Tensor
    r: Tensor
    mask: Tensor
    jvp_index: Tensor
    flow_index: Tensor

    @property
    def n_jvp(self) -> int:
        return self.jvp_index.shape[0]


def jvp_count(batch: int, ratio: float) -> int:
    """Samples with r != t in a batch: round(ratio * B), Python's round (half to even).

    An exact count rather than a per-sample coin flip keeps every tensor shape static from one
    step to the next, which CUDA graphs and torch.compile need and which keeps memory use the
    same at every step (the memory probe's measurement then holds for the whole run).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    return round(ratio * batch)


def sample_t_r(
    batch: int, cfg: LossConfig, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> TimePair:
    """Two independent draws; t = max, r = min; then r = t for exactly B - round(ratio*B) samples."""
    sampler = build_time_sampler(cfg)
    a = sampler.sample(batch, generator, dtype)
    b = sampler.sample(batch, generator, dtype)
    t = torch.maximum(a, b)
    r = torch.minimum(a, b)
    n_jvp = jvp_count(batch, cfg.ratio)
    perm = torch.randperm(batch, generator=generator, device=generator.device)
    jvp_index, flow_index = perm[:n_jvp], perm[n_jvp:]
    mask = torch.zeros(batch, dtype=torch.bool, device=generator.device)
    mask[jvp_index] = True
    r = torch.where(mask, r, t)
    return TimePair(t=t, r=r, mask=mask, jvp_index=jvp_index, flow_index=flow_index)


def sample_t(
    batch: int, cfg: LossConfig, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> Tensor:
    """One time per sample, for flow matching."""
    return build_time_sampler(cfg).sample(batch, generator, dtype)
