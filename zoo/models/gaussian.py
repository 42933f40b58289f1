"""The exact MeanFlow field of Gaussian data: a closed-form reference for samplers and losses."""

import torch
from torch import Tensor

from zoo.flow import expand_time
from zoo.models.base import FlowModel


class GaussianMeanFlow(FlowModel):
    """The exact u(z, t, r) for data N(m, s^2 I) and the path z_t = (1 - t) x + t eps.

    z_t ~ N((1 - t) m, sigma_t^2 I) with sigma_t^2 = (1 - t)^2 s^2 + t^2, and the probability-flow
    ODE maps z_t to z_r = (1 - r) m + (sigma_r / sigma_t)(z_t - (1 - t) m) (an affine map per
    dimension).  So u = (z_t - z_r) / (t - r), and at r = t the instantaneous velocity
    v(z, t) = -m + (sigma_t' / sigma_t)(z - (1 - t) m), sigma_t' = (t - (1 - t) s^2) / sigma_t.
    """

    def __init__(self, mean: Tensor, std: float) -> None:
        super().__init__(tuple(mean.shape))
        self.register_buffer("mean", mean)
        self.std = std

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - t) ** 2 * self.std**2 + t**2)

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        te = expand_time(t, z)
        rate = (te - (1 - te) * self.std**2) / self.sigma(te) ** 2
        return -self.mean + rate * (z - (1 - te) * self.mean)

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        te, re = expand_time(t, z), expand_time(r, z)
        z_r = (1 - re) * self.mean + self.sigma(re) / self.sigma(te) * (z - (1 - te) * self.mean)
        h = te - re
        # The flow map joins any two times, so r > t is answered too (a model called with its
        # times swapped, in scripts/check_meanflow_gaussian.py); r = t is the velocity itself.
        apart = h != 0
        average = (z - z_r) / torch.where(apart, h, torch.ones_like(h))
        return torch.where(apart, average, self.velocity(z, t))
