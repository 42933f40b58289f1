"""What the adaptive weight w = 1/sg(Delta + c)^p does to the r = t (flow-matching) part of MeanFlow.

With the weight held fixed in the gradient, the stationary point of E[w Delta | z, t] is the
weighted mean u = E[w v] / E[w] (w evaluated at u), not E[v | z_t] unless v | z_t is symmetric
about its mean.  For p = 1 and c << Delta this is the minimiser of E log(|u - v|^2 + c), a
mode-seeking estimate.  Data here: x = product of d independent 1-D mixtures
0.5 N(-1, s^2) + 0.5 N(+1, s^2), s = 0.1, so v | z_t is known in closed form (component posterior,
then a Gaussian).  Printed: the fixed point's bias relative to the conditional std of v,
per coordinate, at z_t = 0.3 (every coordinate) for several t and d, and the 1-D ODE sample
std obtained by integrating each field from t = 1 to 0 (data std 1.005).

    .venv/bin/python scripts/meanflow_weighting_bias.py
"""

import math

import numpy as np
import torch

S, C, M = 0.1, 1e-3, 200_000
F64 = torch.float64


def posterior_samples(z: float, t: float, d: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n draws of v = (z - x) / t given z_t = z in every one of d coordinates."""
    var_z = (1 - t) ** 2 * S**2 + t**2
    means = torch.tensor([-1.0, 1.0], dtype=F64)
    logp = -((z - (1 - t) * means) ** 2) / (2 * var_z)
    p_plus = torch.softmax(logp, 0)[1].item()
    k = torch.where(torch.rand(n, d, generator=g, dtype=F64) < p_plus, 1.0, -1.0)
    gain = (1 - t) * S**2 / var_z
    x_mean = k + gain * (z - (1 - t) * k)
    x_std = math.sqrt(S**2 - (1 - t) ** 2 * S**4 / var_z)
    x = x_mean + x_std * torch.randn(n, d, generator=g, dtype=F64)
    return (z - x) / t


def weighted_fixed_point(v: torch.Tensor, p: float, iters: int = 100) -> torch.Tensor:
    u = v.mean(0)
    for _ in range(iters):
        w = ((v - u).square().sum(1) + C).pow(-p)
        u = (w[:, None] * v).sum(0) / w.sum()
    return u


def field_1d(z: torch.Tensor, t: float, p: float, g: torch.Generator, n: int = 1000) -> torch.Tensor:
    return torch.stack(
        [weighted_fixed_point(posterior_samples(float(zi), t, 1, n, g), p, iters=40)[0] for zi in z]
    )


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print("bias of the weighted stationary point, (u_p - E[v|z]) / std(v|z), coordinate mean, z = 0.3:")
    for t in (0.3, 0.6, 0.9):
        for d in (1, 2, 16, 256):
            v = posterior_samples(0.3, t, d, M if d < 16 else M // 8, g)
            mean, std = v.mean(0), v.std(0)
            cells = []
            for p in (0.0, 0.5, 0.75, 1.0):
                cells.append(f"p={p}: {((weighted_fixed_point(v, p) - mean) / std).mean().item():+.3f}")
            print(f"  t={t} d={d:3d}  " + "  ".join(cells))
    print("1-D ODE (Euler, 50 steps, 2000 samples) with the r = t field of each p; data std 1.005:")
    noise = torch.randn(2000, dtype=F64, generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(1.0, 0.0, 51, dtype=F64)
    zs = torch.linspace(-3.5, 3.5, 71, dtype=F64)
    for p in (0.0, 0.75, 1.0):
        z = noise.clone()
        for a, b in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
            table = field_1d(zs, a, p, g)
            z = z + (b - a) * torch.from_numpy(np.interp(z.numpy(), zs.numpy(), table.numpy()))
        print(
            f"  p={p}: sample std {z.std().item():.3f}, fraction within 0.3 of +-1: "
            f"{((z.abs() - 1).abs() < 0.3).double().mean().item():.3f}"
        )


if __name__ == "__main__":
    main()
