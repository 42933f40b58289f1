"""Samplers against an exactly known average-velocity field, guidance formulas, and a tiny MLP
trained with the MeanFlow loss that must reproduce its target at 1 NFE."""

import math

import pytest
import torch
from torch import Tensor, nn

from zoo.config.schema import LossConfig
from zoo.flow import expand_time
from zoo.losses import MeanFlowLoss
from zoo.losses.jvp import jvp_with_primal
from zoo.models.base import FlowModel
from zoo.models.gaussian import GaussianMeanFlow
from zoo.solvers import get_solver, sample_meanflow, sample_ode, steps_for_nfe

F64 = torch.float64


MEAN = torch.tensor([1.5, -1.0], dtype=F64)
STD = 0.5


def test_one_nfe_meanflow_sample_of_exact_field_reproduces_the_gaussian() -> None:
    model = GaussianMeanFlow(MEAN, STD)
    n = 20_000
    noise = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = sample_meanflow(model, noise, 1)
    # The flow map sends eps to m + s eps exactly (a sign error collapses samples to 2 x mean).
    torch.testing.assert_close(x, MEAN + STD * noise)
    assert (x.mean(0) - MEAN).abs().max().item() < 4 * STD / math.sqrt(n)
    assert (x.std(0) - STD).abs().max().item() < 4 * STD / math.sqrt(2 * n)
    # Average velocities compose: 4 jumps land on the same points as 1.
    torch.testing.assert_close(sample_meanflow(model, noise, 4), x)
    torch.testing.assert_close(sample_meanflow(model, noise, torch.tensor([1.0, 0.7, 0.2, 0.0])), x)


def test_ode_sampler_on_instantaneous_velocity_converges_to_the_flow_map() -> None:
    model = GaussianMeanFlow(MEAN, STD)
    noise = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    exact = MEAN + STD * noise
    errors = {
        name: (sample_ode(model, noise, name, 20) - exact).abs().max().item()
        for name in ("euler", "heun", "rk4")
    }
    assert errors["rk4"] < 1e-6 and errors["heun"] < 1e-2 and errors["euler"] < 0.3
    assert errors["rk4"] < errors["heun"] < errors["euler"]


def test_exact_field_satisfies_the_meanflow_identity_with_our_jvp() -> None:
    # u(z, t, r) = v(z, t) - (t - r) du/dt, with du/dt the JVP along (v, 1, 0) for (z, t, r).
    model = GaussianMeanFlow(MEAN, STD)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 2, dtype=F64, generator=g) * 1.3
    a, b = torch.rand(64, dtype=F64, generator=g), torch.rand(64, dtype=F64, generator=g)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    v = model.velocity(z, t)
    u, dudt = jvp_with_primal(model, z, t, r, None, v, "fp32")
    torch.testing.assert_close(u, v - expand_time(t - r, z) * dudt)


class PerturbedGaussianMeanFlow(FlowModel):
    """The exact field plus a zero-initialised linear correction in (z, t, t - r, 1)."""

    def __init__(self, std: float) -> None:
        super().__init__((2,))
        self.exact = GaussianMeanFlow(MEAN, std)
        self.P = nn.Parameter(torch.zeros(2, 5, dtype=F64))

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        features = torch.cat([z, t[:, None], (t - r)[:, None], torch.ones_like(t)[:, None]], dim=1)
        return self.exact(z, t, r) + features @ self.P.T


@pytest.mark.parametrize("mode", ["full_batch", "primal"])
def test_exact_field_is_a_stationary_point_of_the_meanflow_loss(mode: str) -> None:
    # The expected loss gradient vanishes at the true average velocity (the target is linear in
    # v, and E[v | z_t] is the marginal velocity) and not at the field of a wrong data std.  A
    # wrong tangent order, time convention or target sign breaks this.
    loss_fn = MeanFlowLoss(LossConfig(jvp=mode, ratio=0.75, time_sampler="uniform", weight_p=0.0))
    grads = {}
    for std in (STD, 0.35):
        model = PerturbedGaussianMeanFlow(std)
        gen = torch.Generator().manual_seed(0)
        x = MEAN + STD * torch.randn(400_000, 2, dtype=F64, generator=gen)
        loss_fn(model, x, None, gen).loss.backward()
        grads[std] = model.P.grad.abs().max().item()
    assert grads[STD] < 0.02  # ~7 standard errors of the Monte Carlo mean at this batch size
    assert grads[0.35] > 0.08


class CondLinear(FlowModel):
    """u = W_y z + b_y (t - r) + c t: class-dependent, so guidance has something to mix."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__((dim,), num_classes)
        g = torch.Generator().manual_seed(3)
        self.W = nn.Parameter(torch.randn(num_classes + 1, dim, dim, dtype=F64, generator=g))
        self.b = nn.Parameter(torch.randn(num_classes + 1, dim, dtype=F64, generator=g))
        self.c = nn.Parameter(torch.randn(dim, dtype=F64, generator=g))
        self.batch_sizes: list[int] = []

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        self.batch_sizes.append(z.shape[0])
        return torch.einsum("bij,bj->bi", self.W[y], z) + self.b[y] * (t - r)[:, None] + self.c * t[:, None]


@torch.no_grad()
def test_guidance_scale_one_is_conditional_and_scale_w_matches_formula() -> None:
    model = CondLinear(3, num_classes=4)
    noise = torch.randn(10, 3, dtype=F64)
    y = torch.randint(0, 4, (10,))
    one, zero = torch.ones(10, dtype=F64), torch.zeros(10, dtype=F64)
    null = torch.full_like(y, model.null_class)
    cond, uncond = model(noise, one, zero, y), model(noise, one, zero, null)
    model.batch_sizes.clear()

    torch.testing.assert_close(sample_meanflow(model, noise, 1, y=y, guidance=1.0), noise - cond)
    assert model.batch_sizes == [10]
    model.batch_sizes.clear()
    w = 2.5
    torch.testing.assert_close(
        sample_meanflow(model, noise, 1, y=y, guidance=w), noise - (uncond + w * (cond - uncond))
    )
    assert model.batch_sizes == [20]  # one batched call: conditional and null halves together
    # ODE sampling uses u(z, t, t): one Euler step from 1 to 0 is z - u(z, 1, 1) with guidance.
    model.batch_sizes.clear()
    cond_tt, uncond_tt = model(noise, one, one, y), model(noise, one, one, null)
    model.batch_sizes.clear()
    out = sample_ode(model, noise, "euler", 1, y=y, guidance=w)
    torch.testing.assert_close(out, noise - (uncond_tt + w * (cond_tt - uncond_tt)))
    assert model.batch_sizes == [20]


@torch.no_grad()
def test_sampler_model_call_counts_and_label_checks() -> None:
    model = CondLinear(2, num_classes=3)
    noise, y = torch.randn(4, 2, dtype=F64), torch.zeros(4, dtype=torch.long)
    sample_meanflow(model, noise, 3, y=y)
    assert model.batch_sizes == [4, 4, 4]
    model.batch_sizes.clear()
    heun = get_solver("heun")
    sample_ode(model, noise, heun, steps_for_nfe(heun, 8), y=y)
    assert len(model.batch_sizes) == 8
    with pytest.raises(ValueError, match="class-conditional"):
        sample_meanflow(model, noise, 1)
    with pytest.raises(ValueError, match="guidance"):
        sample_meanflow(GaussianMeanFlow(MEAN, STD), noise, 1, guidance=2.0)
    with pytest.raises(ValueError, match="noise"):
        sample_meanflow(GaussianMeanFlow(MEAN, STD), noise, [0.0, 1.0])


class SmallMLP(FlowModel):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__((2,))
        self.net = nn.Sequential(
            nn.Linear(4, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(torch.cat([z, t[:, None], (t - r)[:, None]], dim=1))


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP spinning on a shared 2-core box costs 10x+."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_mlp_trained_with_meanflow_loss_reproduces_gaussian_at_one_nfe(one_thread) -> None:
    # The paper's CIFAR-10 time settings: logit-normal(-2, 2), ratio 0.75, p = 0.75. (Uniform
    # times under-sample t near 0, where the spread is set, and train ~3x slower here.)
    torch.manual_seed(0)
    model = SmallMLP()
    cfg = LossConfig(jvp="primal", ratio=0.75, time_mu=-2.0, time_sigma=2.0, weight_p=0.75)
    loss_fn = MeanFlowLoss(cfg)
    steps = 500
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(1)
    mean = MEAN.float()
    for _ in range(steps):
        x = mean + STD * torch.randn(256, 2, generator=gen)
        out = loss_fn(model, x, None, gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        samples = sample_meanflow(model, torch.randn(4000, 2, generator=gen), 1)
    assert (samples.mean(0) - mean).abs().max().item() < 0.15, samples.mean(0)
    assert ((samples.std(0) / STD) - 1).abs().max().item() < 0.2, samples.std(0)
