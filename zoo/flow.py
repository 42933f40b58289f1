"""The one time convention of zoo, used by training, every sampler and every evaluator.

    z_t = (1 - t) * x + t * eps,    t = 0 is data, t = 1 is noise   (the MeanFlow paper's)

The conditional (instantaneous) velocity is v = dz_t/dt = eps - x.  Sampling integrates from
t = 1 (noise) down to t = 0 (data).  A MeanFlow network u(z, t, r) predicts the average velocity
over [r, t] (r <= t), so one step from t to r is z_r = z_t - (t - r) * u(z_t, t, r); with r = t it
is the instantaneous velocity v(z_t, t), which is what flow-matching models learn and what ODE
solvers integrate.  Every model is called as model(z, t, r, y) with t and r of shape (batch,).
"""

import torch
from torch import Tensor

DATA_TIME = 0.0
NOISE_TIME = 1.0


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample times (B,) so they broadcast against a batch shaped like `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) x + t eps for per-sample times t of shape (B,)."""
    t = expand_time(t, x)
    return (1 - t) * x + t * noise


def conditional_velocity(x: Tensor, noise: Tensor) -> Tensor:
    """v = dz_t/dt = eps - x along the straight path from data to noise."""
    return noise - x


def step_average_velocity(z_t: Tensor, u: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """Move from time t to time r with average velocity u: z_r = z_t - (t - r) u."""
    return z_t - expand_time(t - r, z_t) * u


def full_time(batch: int, value: float, device: torch.device | str, dtype=torch.float32) -> Tensor:
    return torch.full((batch,), value, device=device, dtype=dtype)
