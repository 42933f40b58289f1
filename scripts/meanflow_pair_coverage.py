"""How often zoo's MeanFlow time sampler draws (t, r) pairs near the jumps of the k-step samplers.

    .venv/bin/python scripts/meanflow_pair_coverage.py

For each time-sampler setting: the fraction of training samples with r != t and (t, r) within
+-w of the jump (1 -> 0) of the 1-step sampler and of the two jumps (1 -> 0.5, 0.5 -> 0) of the
2-step sampler (count of N in brackets), and the fraction with t > 0.9 at all.
"""

import torch

from zoo.config.schema import LossConfig
from zoo.losses.time_sampling import sample_t_r

N, W = 4_000_000, 0.05
SETTINGS = {
    "logit-normal(-0.4, 1.0), ratio 0.75 (moons / ImageNet-like)": dict(
        time_mu=-0.4, time_sigma=1.0, ratio=0.75
    ),
    "logit-normal(-0.4, 1.0), ratio 0.25 (paper ImageNet)": dict(time_mu=-0.4, time_sigma=1.0, ratio=0.25),
    "logit-normal(-2.0, 2.0), ratio 0.75 (paper CIFAR-10)": dict(time_mu=-2.0, time_sigma=2.0, ratio=0.75),
    "uniform, ratio 0.75": dict(time_sampler="uniform", ratio=0.75),
}


def near(t, r, t0, r0):
    return ((t - t0).abs() <= W) & ((r - r0).abs() <= W) & (t > r)


for name, kw in SETTINGS.items():
    times = sample_t_r(N, LossConfig(**kw), torch.Generator().manual_seed(0))
    t, r = times.t.double(), times.r.double()
    cells = {"1->0": near(t, r, 1.0, 0.0), "1->0.5": near(t, r, 1.0, 0.5), "0.5->0": near(t, r, 0.5, 0.0)}
    text = "  ".join(f"{k}: {v.double().mean().item() * 100:.4f}% ({int(v.sum())})" for k, v in cells.items())
    print(f"{name}\n    {text}  t>0.9: {(t > 0.9).double().mean().item() * 100:.2f}%")
