"""MeanFlow and flow-matching losses against finite differences and hand-computed closed forms."""

import math

import pytest
import torch
from torch import Tensor, nn

from zoo.config.schema import LossConfig
from zoo.losses import FlowMatchingLoss, MeanFlowLoss, build_loss
from zoo.models.base import FlowModel
from zoo.models.gaussian import GaussianMeanFlow

F64 = torch.float64


def randn(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64)


class TinyMLP(FlowModel):
    """u(z, t, r, y) for data of any shape; t and h = t - r enter as two input features."""

    def __init__(self, data_shape: tuple[int, ...] = (2,), hidden: int = 32, num_classes: int = 0) -> None:
        super().__init__(data_shape, num_classes)
        dim = math.prod(data_shape)
        self.inp = nn.Linear(dim + 2, hidden)
        if num_classes:
            self.embed = nn.Embedding(num_classes + 1, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.inp(torch.cat([z.flatten(1), t[:, None], (t - r)[:, None]], dim=1))
        if self.num_classes:
            h = h + self.embed(y)
        return self.body(h).view_as(z)


class LinearField(FlowModel):
    """u(z, t, r) = A z + b t + c r + d: du/dt along (v, 1, 0) is exactly A v + b."""

    def __init__(self, dim: int) -> None:
        super().__init__((dim,))
        self.A = nn.Parameter(randn(dim, dim) / dim)
        self.b = nn.Parameter(randn(dim))
        self.c = nn.Parameter(randn(dim))
        self.d = nn.Parameter(randn(dim))

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        return z @ self.A.T + t[:, None] * self.b + r[:, None] * self.c + self.d


class Recorder(FlowModel):
    """Wraps a model and keeps the inputs of every call."""

    def __init__(self, inner: FlowModel) -> None:
        super().__init__(inner.data_shape, inner.num_classes)
        self.inner = inner
        self.calls: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls.append((z.detach().clone(), t.detach().clone(), r.detach().clone(), y))
        return self.inner(z, t, r, y)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cfg(**kw) -> LossConfig:
    return LossConfig(**{"jvp": "nograd", **kw})


@pytest.mark.parametrize("mode", ["nograd", "full_batch", "primal", "selective"])
def test_loss_jvp_matches_central_finite_differences(mode: str) -> None:
    torch.manual_seed(0)
    model = TinyMLP(data_shape=(2, 3)).double()
    x = randn(16, 2, 3)
    terms = MeanFlowLoss(cfg(jvp=mode, ratio=0.5)).terms(model, x, None, gen())
    z, t, r, v = terms.z, terms.times.t, terms.times.r, terms.v
    eps = 1e-6
    with torch.no_grad():
        fd = (model(z + eps * v, t + eps, r, None) - model(z - eps * v, t - eps, r, None)) / (2 * eps)
    mask = terms.times.mask
    torch.testing.assert_close(terms.dudt[mask], fd[mask], rtol=1e-7, atol=1e-8)
    # r = t samples may carry zeros (their JVP term is multiplied by t - r = 0).
    assert torch.equal(terms.target[~mask], terms.v[~mask])


def test_target_is_v_when_r_equals_t() -> None:
    torch.manual_seed(1)
    terms = MeanFlowLoss(cfg(ratio=0.0)).terms(TinyMLP().double(), randn(32, 2), None, gen())
    assert torch.equal(terms.times.r, terms.times.t)
    x = terms.noise - terms.v  # v = eps - x
    torch.testing.assert_close(terms.target, terms.noise - x)


@pytest.mark.parametrize(("p", "c"), [(1.0, 1e-3), (0.75, 1e-2), (0.0, 1e-3)])
@pytest.mark.parametrize("mode", ["nograd", "full_batch", "primal", "selective"])
def test_linear_model_loss_and_gradients_match_closed_form(p: float, c: float, mode: str) -> None:
    torch.manual_seed(2)
    dim, batch = 3, 12
    model = LinearField(dim)
    x = 2.0 + 0.5 * randn(batch, dim)
    loss_fn = MeanFlowLoss(cfg(jvp=mode, ratio=0.5, weight_p=p, weight_c=c, time_sampler="uniform"))
    terms = loss_fn.terms(model, x, None, gen(3))
    terms.loss.backward()

    # By hand, from the drawn noise and times only.
    eps, t, r = terms.noise, terms.times.t[:, None], terms.times.r[:, None]
    A, b, cc, d = (p_.detach() for p_ in (model.A, model.b, model.c, model.d))
    z = (1 - t) * x + t * eps
    v = eps - x
    u = z @ A.T + t * b + r * cc + d
    dudt = v @ A.T + b
    target = v - (t - r) * dudt
    delta = ((u - target) ** 2).sum(1)
    w = 1.0 / (delta + c) ** p
    torch.testing.assert_close(terms.loss, (w * delta).mean())
    g = 2.0 * (w / batch)[:, None] * (u - target)  # dL/du with w and the target held fixed
    torch.testing.assert_close(model.A.grad, g.T @ z)
    torch.testing.assert_close(model.b.grad, (g * t).sum(0))
    torch.testing.assert_close(model.c.grad, (g * r).sum(0))
    torch.testing.assert_close(model.d.grad, g.sum(0))


def test_metrics_are_floats_with_raw_mse_per_dimension() -> None:
    torch.manual_seed(3)
    model, x = TinyMLP(data_shape=(2, 3)).double(), randn(8, 2, 3)
    loss_fn = MeanFlowLoss(cfg(ratio=0.25))
    out = loss_fn(model, x, None, gen(4))
    terms = loss_fn.terms(model, x, None, gen(4))  # same seed: same draws
    assert set(out.metrics) == {"loss", "mse", "weight"}
    assert all(isinstance(v, float) for v in out.metrics.values())
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.metrics["loss"] == pytest.approx(out.loss.item())
    assert out.metrics["mse"] == pytest.approx(((terms.u - terms.target) ** 2).mean().item())
    assert out.metrics["weight"] == pytest.approx(terms.weight.mean().item())


def test_noise_and_times_differ_across_consecutive_calls() -> None:
    torch.manual_seed(4)
    model, x = TinyMLP().double(), randn(64, 2)
    loss_fn = MeanFlowLoss(cfg())
    g = gen(7)
    first, second = loss_fn.terms(model, x, None, g), loss_fn.terms(model, x, None, g)
    assert not torch.allclose(first.noise, second.noise)
    assert not torch.allclose(first.times.t, second.times.t)
    assert first.loss.item() != second.loss.item()


def test_flow_matching_loss_is_mse_to_eps_minus_x_at_r_equals_t() -> None:
    torch.manual_seed(5)
    model = Recorder(TinyMLP(data_shape=(2, 3)).double())
    x = randn(32, 2, 3)
    out = build_loss(LossConfig(kind="flow_matching")).__call__(model, x, None, gen())
    ((z, t, r, _),) = model.calls
    assert torch.equal(t, r)
    tt = t[:, None, None]
    eps = (z - (1 - tt) * x) / tt  # invert z = (1 - t) x + t eps
    with torch.no_grad():
        expected = ((model.inner(z, t, r) - (eps - x)) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.metrics["loss"] == pytest.approx(expected.item())
    assert isinstance(build_loss(LossConfig(kind="flow_matching")), FlowMatchingLoss)


def test_label_dropout_uses_the_null_class_at_the_configured_rate() -> None:
    torch.manual_seed(6)
    model = TinyMLP(num_classes=3).double()
    x, y = randn(4000, 2), torch.randint(0, 3, (4000,))
    for p in (0.0, 0.3, 1.0):
        terms = MeanFlowLoss(cfg(class_dropout=p)).terms(model, x, y, gen())
        assert torch.equal(terms.y == model.null_class, terms.dropped)
        assert torch.equal(terms.y[~terms.dropped], y[~terms.dropped])
        rate = terms.dropped.double().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 4000) + 1e-12


def test_label_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        MeanFlowLoss(cfg()).terms(TinyMLP(num_classes=3), torch.randn(4, 2), None, gen())
    with pytest.raises(ValueError, match="unconditional"):
        MeanFlowLoss(cfg()).terms(TinyMLP(), torch.randn(4, 2), torch.zeros(4, dtype=torch.long), gen())


@pytest.mark.parametrize("kappa", [0.0, 0.3])
def test_training_time_guidance_matches_formula_inside_interval_only(kappa: float) -> None:
    torch.manual_seed(7)
    model = TinyMLP(num_classes=3).double().eval()
    x, y = randn(256, 2), torch.randint(0, 3, (256,))
    omega, t_min, t_max = 0.6, 0.2, 0.7
    loss_fn = MeanFlowLoss(
        cfg(
            guidance_omega=omega,
            guidance_kappa=kappa,
            guidance_t_min=t_min,
            guidance_t_max=t_max,
            class_dropout=0.3,
        )
    )
    terms = loss_fn.terms(model, x, y, gen(8))
    t, z, eps = terms.times.t, terms.z, terms.noise
    v = eps - x
    with torch.no_grad():
        cond = model(z, t, t, terms.y)
        uncond = model(z, t, t, torch.full_like(y, model.null_class))
    guided = omega * v + kappa * cond + (1 - omega - kappa) * uncond
    inside = (t >= t_min) & (t <= t_max) & ~terms.dropped
    assert 0 < int(inside.sum()) < 256 and bool(terms.dropped.any())
    torch.testing.assert_close(terms.v[inside], guided[inside])
    torch.testing.assert_close(terms.v[~inside], v[~inside], rtol=0, atol=0)
    # The guided velocity is also the target's velocity (at r = t the target is v_g itself).
    same = ~terms.times.mask
    torch.testing.assert_close(terms.target[same], terms.v[same])


def test_guidance_with_unconditional_model_raises() -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        MeanFlowLoss(cfg(guidance_omega=2.0)).terms(TinyMLP(), torch.randn(4, 2), None, gen())


def test_build_loss_needs_a_resolved_jvp_mode() -> None:
    with pytest.raises(ValueError, match="plan_run"):
        build_loss(LossConfig(jvp="auto"))
    assert isinstance(build_loss(LossConfig(jvp="primal")), MeanFlowLoss)


@pytest.mark.parametrize("mode", ["nograd", "primal", "selective", "full_batch"])
def test_loss_at_the_exact_gaussian_field_equals_its_closed_form_conditional_variance(mode: str) -> None:
    """At the exact average velocity u* of data N(m, s^2 I) the MeanFlow residual is
    u* - u_tgt = (sigma_r / sigma_t)(E[v | z_t] - v), so E[Delta | t, r] = d s^2 sigma_r^2 / sigma_t^4
    (sigma_t^2 = (1 - t)^2 s^2 + t^2).  A tangent on r instead of t, the target's sign or swapped
    times move this by 18-170% (scripts/check_meanflow_gaussian.py); sampling noise here is <1%."""
    mean, std = torch.tensor([1.5, -1.0], dtype=torch.float64), 0.5
    model = GaussianMeanFlow(mean, std)
    x = mean + std * torch.randn(40_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cfg = LossConfig(jvp=mode, ratio=0.75, time_sampler="uniform", weight_p=0.0)
    terms = MeanFlowLoss(cfg).terms(model, x, None, torch.Generator().manual_seed(2))
    t, r = terms.times.t, terms.times.r
    closed_form = 2 * std**2 * model.sigma(r) ** 2 / model.sigma(t) ** 4
    far = (t - r) >= 0.3  # where a wrong JVP would show most
    for rows in (slice(None), far):
        ratio = terms.delta.detach()[rows].mean() / closed_form[rows].mean()
        assert abs(ratio.item() - 1.0) < 0.03, ratio
