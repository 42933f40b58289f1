"""Closed-form checks of zoo's MeanFlow sampler and loss on Gaussian data N(m, s^2 I).

For this data the probability-flow map from t to r is affine, so the exact average velocity
u*(z, t, r) = (z - z_r) / (t - r) is known (see GaussianMeanFlow).  Checks:

1. sample_meanflow with u* gives exact samples m + s eps for 1, 2, 4 steps and an uneven grid.
2. zoo's MeanFlow loss at u*: the residual u* - u_tgt = (sigma_r / sigma_t) (v_marg - v), whose
   conditional variance per dimension is Var(v | z_t) = s^2 / sigma_t^2, so
       E[Delta | t, r] = d s^2 sigma_r^2 / sigma_t^4          (sigma_t^2 = (1-t)^2 s^2 + t^2).
   The script compares zoo's per-sample Delta with this (ratio of means -> 1) for every JVP
   mode that takes a plain FlowModel, and shows that the same check fails for the usual port
   mistakes (tangent on r instead of t, target sign, model called with (r, t) swapped).

    .venv/bin/python scripts/check_meanflow_gaussian.py
"""

import torch
from torch import Tensor

from zoo.config.schema import LossConfig
from zoo.flow import expand_time
from zoo.losses import MeanFlowLoss
from zoo.models.base import FlowModel
from zoo.models.gaussian import GaussianMeanFlow
from zoo.solvers import sample_meanflow

F64 = torch.float64


class SwappedTimes(GaussianMeanFlow):
    """A deliberately wrong model: reads its (t, r) arguments swapped."""

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        return super().forward(z, r, t, y)


def main() -> None:
    torch.manual_seed(0)
    mean, std = torch.tensor([1.5, -1.0], dtype=F64), 0.5
    model = GaussianMeanFlow(mean, std)
    noise = torch.randn(50_000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = mean + std * noise
    print("1. sampler with the exact average velocity (max |x - (m + s eps)|):")
    for steps in (1, 2, 4, [1.0, 0.9, 0.5, 0.0], [1.0, 0.5, 0.0]):
        err = (sample_meanflow(model, noise, steps) - exact).abs().max().item()
        print(f"   steps={steps!s:22s} {err:.2e}")
    err_swap = (sample_meanflow(SwappedTimes(mean, std), noise, 2) - exact).abs().max().item()
    print(f"   (model reading (t, r) swapped, 2 steps: {err_swap:.2e})")

    print("2. MeanFlow loss at the exact field: mean Delta / mean closed form, by h = t - r bin")
    n = 400_000
    x = mean + std * torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    d = x.shape[1]

    def closed_form(t: Tensor, r: Tensor) -> Tensor:
        return d * std**2 * model.sigma(r) ** 2 / model.sigma(t) ** 4

    bins = [(0.0, 1e-12), (1e-12, 0.2), (0.2, 0.5), (0.5, 1.0)]

    def report(name: str, delta: Tensor, t: Tensor, r: Tensor) -> None:
        cf = closed_form(t, r)
        h = t - r
        parts = []
        for lo, hi in bins:
            sel = (h >= lo) & (h < hi) if hi > 1e-12 else h == 0
            if sel.any():
                parts.append(
                    f"h in [{lo:.1g},{hi:.1g}): {delta[sel].mean().item() / cf[sel].mean().item():.4f}"
                )
        print(f"   {name:34s} all: {delta.mean().item() / cf.mean().item():.4f}   " + "  ".join(parts))

    for mode in ("primal", "nograd", "full_batch", "selective"):
        cfg = LossConfig(jvp=mode, ratio=0.75, time_sampler="uniform", weight_p=0.0)
        terms = MeanFlowLoss(cfg).terms(model, x, None, torch.Generator().manual_seed(2))
        report(f"zoo loss, jvp={mode}", terms.delta.detach(), terms.times.t, terms.times.r)
    cfg = LossConfig(jvp="primal", ratio=0.75, time_mu=-0.4, time_sigma=1.0, weight_p=1.0)
    terms = MeanFlowLoss(cfg).terms(model, x, None, torch.Generator().manual_seed(2))
    report("zoo loss, moons preset times", terms.delta.detach(), terms.times.t, terms.times.r)

    # The same check on hand-made wrong variants, to show it detects them.
    t, r, z, v = terms.times.t, terms.times.r, terms.z, terms.v

    def jvp(tangent_t: float, tangent_r: float, m: FlowModel = model) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(
            lambda a, b, c: m(a, b, c),
            (z, t, r),
            (v, torch.full_like(t, tangent_t), torch.full_like(r, tangent_r)),
        )

    hcol = expand_time(t - r, z)
    u, dudt = jvp(1.0, 0.0)
    report("check: hand-written (v,1,0), minus", ((u - (v - hcol * dudt)) ** 2).sum(1), t, r)
    u, dudr = jvp(0.0, 1.0)
    report("wrong: tangent on r (v,0,1)", ((u - (v - hcol * dudr)) ** 2).sum(1), t, r)
    report("wrong: target sign v + (t-r) du/dt", ((u - (v + hcol * dudt)) ** 2).sum(1), t, r)
    swapped = SwappedTimes(mean, std)
    u, dudt = jvp(1.0, 0.0, swapped)
    report("wrong: model reads (r, t)", ((u - (v - hcol * dudt)) ** 2).sum(1), t, r)


if __name__ == "__main__":
    main()
