"""alpha-Flow's target against flow matching (alpha = 1), its own formula, and MeanFlow (alpha -> 0)."""

import pytest
import torch

from tests.model_helpers import perturb
from zoo.config.schema import LossConfig, MLPConfig
from zoo.flow import conditional_velocity, interpolate
from zoo.losses import build_loss
from zoo.losses.alphaflow import AlphaFlowLoss, alpha_at
from zoo.models import build_model

F64 = torch.float64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb(build_model(MLPConfig(hidden=16, depth=2, time_embed_dim=16), (2,)).double(), scale=0.3)


def setup(model, alpha: float, ratio: float = 0.5):
    loss: AlphaFlowLoss = build_loss(LossConfig(kind="alphaflow", ratio=ratio, jvp="nograd"))
    loss.alpha = alpha
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    draws = loss.draw(model, x, None, torch.Generator().manual_seed(2))
    z = interpolate(x, draws.noise, draws.times.t)
    v = conditional_velocity(x, draws.noise)
    return loss, x, draws, z, v


def test_alpha_one_is_flow_matching(model):
    loss, x, draws, z, v = setup(model, alpha=1.0)
    assert torch.equal(loss.target(model, z, v, draws), v)


@pytest.mark.parametrize("alpha", [0.7, 0.2])
def test_target_is_the_papers_formula(model, alpha):
    loss, x, draws, z, v = setup(model, alpha)
    t, r = draws.times.t, draws.times.r
    ji, fi = draws.times.jvp_index, draws.times.flow_index
    delta = alpha * (t - r)[:, None]
    with torch.no_grad():
        u_earlier = model(z - delta * v, t - delta[:, 0], r)
    expected = (delta * v + ((t - r)[:, None] - delta) * u_earlier) / (t - r)[:, None]
    target = loss.target(model, z, v, draws)
    assert torch.allclose(target[ji], expected[ji], atol=1e-12)
    assert torch.equal(target[fi], v[fi])  # r = t: flow matching's target


def test_small_alpha_tends_to_the_meanflow_target(model):
    alpha = 1e-6
    loss, x, draws, z, v = setup(model, alpha, ratio=1.0)
    target = loss.target(model, z, v, draws)
    with torch.no_grad():
        u = model(z, draws.times.t, draws.times.r)
    meanflow_target = loss.meanflow.terms_of(model, x, draws).target
    recovered = (target - (1 - alpha) * u) / alpha
    error = (recovered - meanflow_target).abs().max()
    assert error < 1e-4 * meanflow_target.abs().max()
    # and the limit is not trivially met: at alpha = 0.1 the same quantity is visibly off
    loss.alpha = 0.1
    coarse = (loss.target(model, z, v, draws) - 0.9 * u) / 0.1
    assert (coarse - meanflow_target).abs().max() > 100 * error


def test_schedule_and_the_switch_to_the_jvp_path(model):
    cfg = LossConfig(kind="alphaflow", alpha_start=0.2, alpha_end=0.8, alpha_steepness=10.0)
    assert alpha_at(cfg, 0.0) == 1.0 and alpha_at(cfg, 0.2) == 1.0
    assert alpha_at(cfg, 0.5) == pytest.approx(0.5)
    assert alpha_at(cfg, 0.8) == 0.0 and alpha_at(cfg, 1.0) == 0.0
    values = [alpha_at(cfg, p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    loss, x, draws, _, _ = setup(model, alpha=1.0)
    loss.set_progress(50, 100)
    _, metrics = loss.evaluate(model, x, draws)
    assert metrics["jvp_path"] == 0 and metrics["alpha"] == pytest.approx(alpha_at(loss.cfg, 0.5))
    loss.set_progress(99, 100)
    assert loss.alpha < loss.cfg.alpha_threshold
    value, metrics = loss.evaluate(model, x, draws)
    assert metrics["jvp_path"] == 1
    assert torch.allclose(value, loss.meanflow.terms_of(model, x, draws).loss)


def test_schedule_must_run_forwards():
    with pytest.raises(ValueError, match="alpha_start"):
        LossConfig(kind="alphaflow", alpha_start=0.8, alpha_end=0.2)


def test_small_alpha_gives_meanflows_gradient_not_one_over_alpha_times_it(model):
    """With the adaptive weight (p = 1) the r != t rows' error shrinks like alpha; the weight's
    factor alpha keeps their gradient at MeanFlow's (JVP target) scale as alpha -> 0."""
    loss, x, draws, z, v = setup(model, alpha=1e-4, ratio=1.0)
    loss.cfg = loss.cfg.model_copy(update={"weight_c": 1e-12, "alpha_threshold": 1e-6})  # no switch
    loss.meanflow.cfg = loss.cfg

    def gradient(value):
        model.zero_grad()
        value.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    alphaflow_loss, metrics = loss.evaluate(model, x, draws)
    assert metrics["jvp_path"] == 0  # the alpha-blend target, not the JVP one
    alphaflow = gradient(alphaflow_loss)
    meanflow = gradient(loss.meanflow.evaluate(model, x, draws)[0])
    ratio = alphaflow.norm() / meanflow.norm()
    cosine = torch.dot(alphaflow, meanflow) / (alphaflow.norm() * meanflow.norm())
    assert 0.9 < ratio < 1.1 and cosine > 0.99, (ratio, cosine)
