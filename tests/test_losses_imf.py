"""Improved MeanFlow (iMF) against finite differences, closed forms and its own definition."""

import pytest
import torch
from torch import Tensor

from tests.model_helpers import perturb
from zoo.config.schema import DiTConfig, LossConfig, MLPConfig, UNetConfig
from zoo.flow import conditional_velocity, expand_time, interpolate
from zoo.losses import build_loss
from zoo.losses.imf import ImprovedMeanFlowLoss
from zoo.models import build_model
from zoo.models.base import RowTangentModel
from zoo.models.embeddings import GuidanceInputs
from zoo.models.layers import Linear
from zoo.solvers.samplers import Guidance, guided_prediction

F64 = torch.float64
CLASSES = 3

ARCHS = {
    "mlp": (MLPConfig(hidden=16, depth=2, time_embed_dim=16), (2,)),
    "unet": (
        UNetConfig(
            channels=8, channel_mults=[1, 2], blocks_per_res=1, attention_res=[4], num_groups=4, dropout=0.0
        ),
        (1, 8, 8),
    ),
    "dit": (DiTConfig(hidden=16, depth=2, heads=2, patch_size=4), (1, 8, 8)),
}


def imf_model(arch: str, guidance: bool, time_inputs: str = "t_h") -> RowTangentModel:
    cfg, shape = ARCHS[arch]
    cfg = cfg.model_copy(update={"v_head": 1, "guidance_inputs": guidance, "time_inputs": time_inputs})
    torch.manual_seed(0)
    return perturb(build_model(cfg, shape, CLASSES if guidance else 0).double(), scale=0.2)


def batch(model: RowTangentModel, n: int = 8) -> tuple[Tensor, Tensor | None]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((n, *model.data_shape), generator=generator, dtype=F64)
    y = torch.randint(0, CLASSES, (n,), generator=generator) if model.num_classes else None
    return x, y


def imf_loss(**overrides) -> ImprovedMeanFlowLoss:
    return build_loss(LossConfig(**{"kind": "imf", "ratio": 0.5, "weight_c": 0.01, **overrides}))


def terms(loss: ImprovedMeanFlowLoss, model: RowTangentModel, x: Tensor, y: Tensor | None, seed: int = 1):
    draws = loss.draw(model, x, y, torch.Generator().manual_seed(seed))
    return draws, loss.terms_of(model, x, draws)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("mode", ["fused", "nograd"])
@pytest.mark.parametrize("time_inputs", ["t_h", "h"])
def test_jvp_matches_finite_differences_along_the_predicted_velocity(arch, guidance, mode, time_inputs):
    model = imf_model(arch, guidance, time_inputs)
    x, y = batch(model)
    draws, out = terms(imf_loss(jvp=mode), model, x, y)
    ji, times, g = draws.times.jvp_index, draws.times, draws.guidance
    t, r, z = times.t[ji], times.r[ji], out.z[ji]
    yj = None if y is None else draws.y[ji]
    gj = None if g is None else g.rows(ji)
    with torch.no_grad():
        # The tangent is the model's own velocity: its v-head at r = t with the sample's label and
        # its guidance at t (omega where t is in its interval, else 1, over [0, 1]).
        at_t = None if gj is None else velocity_inputs(gj, t)
        assert torch.allclose(out.tangent, model.velocity(z, t, yj, at_t), atol=1e-12)
        h = 1e-6

        def u_at(sign: float) -> Tensor:
            return model(z + sign * h * out.tangent, t + sign * h, r, yj, gj)

        fd = (u_at(1.0) - u_at(-1.0)) / (2 * h)
    assert (out.dudt[ji] - fd).abs().max() <= 1e-6 * fd.abs().max()
    assert out.dudt[draws.times.flow_index].abs().max() == 0


def test_compound_velocity_is_u_where_r_equals_t():
    model = imf_model("mlp", guidance=True)
    x, y = batch(model)
    draws, out = terms(imf_loss(ratio=0.0), model, x, y)
    assert torch.equal(draws.times.t, draws.times.r)
    assert torch.equal(out.compound, out.u.to(F64))
    assert torch.allclose(out.delta_u, (out.u - out.target).square().sum(1))


class LinearHeads(RowTangentModel):
    """u = A z + b t + c r, v = P z + q t: du/dt along (v_hat, 1, 0) is A v_hat + b exactly."""

    guidance_embed = None

    def __init__(self, dim: int) -> None:
        super().__init__((dim,))
        self.u_z, self.u_time = Linear(dim, dim, bias=False), Linear(2, dim, bias=False)
        self.v_z, self.v_time = Linear(dim, dim, bias=False), Linear(2, dim, bias=False)

    @property
    def has_v_head(self) -> bool:
        return True

    def condition(self, t, r, y, guidance=None):
        return torch.stack([t, r], dim=1)

    def trunk(self, z, emb):
        return z

    def head(self, z, emb, name):
        if name == "u":
            return self.u_z(z) + self.u_time(emb)
        # the v-head sees only t: zero its r column
        return self.v_z(z) + self.v_time(emb * torch.tensor([1.0, 0.0], dtype=F64))


@pytest.mark.parametrize("mode", ["fused", "nograd"])
def test_linear_model_closed_form(mode):
    torch.manual_seed(0)
    dim = 3
    model = perturb(LinearHeads(dim).double(), scale=0.5)
    x = torch.randn(16, dim, dtype=F64)
    loss = imf_loss(jvp=mode, weight_p=1.0, weight_c=0.01)
    draws, out = terms(loss, model, x, None)
    t, r, noise = draws.times.t, draws.times.r, draws.noise
    A, B = model.u_z.weight, model.u_time.weight
    P, Q = model.v_z.weight, model.v_time.weight
    with torch.no_grad():
        z = (1 - t[:, None]) * x + t[:, None] * noise
        v_hat = z @ P.T + t[:, None] * Q[:, 0]
        u = z @ A.T + t[:, None] * B[:, 0] + r[:, None] * B[:, 1]
        dudt = v_hat @ A.T + B[:, 0]
        compound = u + (t - r)[:, None] * dudt
        target = noise - x
        v_pred = v_hat  # the v-head ignores r
        d_u = (compound - target).square().sum(1)
        d_v = (v_pred - target).square().sum(1)
        expected = (d_u / (d_u + 0.01)).mean() + (d_v / (d_v + 0.01)).mean()
    assert torch.allclose(out.compound, compound, atol=1e-12)
    assert torch.allclose(out.loss, expected, atol=1e-12)
    # The gradient reaches u through V's first term only (du/dt is stopped): d loss / d b_t.
    out.loss.backward()
    w_u = 1 / (d_u + 0.01)
    residual = compound - target
    grad_u_time = ((2 * w_u / len(x))[:, None] * residual).T @ torch.stack([t, r], 1)
    assert torch.allclose(model.u_time.weight.grad, grad_u_time, atol=1e-10)


def velocity_inputs(g: GuidanceInputs, t: Tensor) -> GuidanceInputs:
    """The velocity at t is queried as r = t rows train: over [0, 1], with omega where t lies in
    the row's interval and 1 outside it."""
    acts = (t >= g.t_min) & (t <= g.t_max)
    ones = torch.ones_like(t)
    return GuidanceInputs(omega=torch.where(acts, g.omega, ones), t_min=0 * ones, t_max=ones)


def test_guided_target_follows_its_formula_inside_the_interval_only():
    model = imf_model("mlp", guidance=True)
    x, y = batch(model, n=64)
    draws, out = terms(imf_loss(), model, x, y)
    g, t = draws.guidance, draws.times.t
    null = torch.full_like(draws.y, CLASSES)
    plain = GuidanceInputs.constant(len(x), 1.0, (0.0, 1.0), x.device, F64)
    with torch.no_grad():
        v_c = model.velocity(out.z, t, draws.y, velocity_inputs(g, t))
        v_u = model.velocity(out.z, t, null, plain)
    v = conditional_velocity(x, draws.noise)
    inside = (t >= g.t_min) & (t <= g.t_max) & ~draws.dropped
    scale = torch.where(inside, 1 - 1 / g.omega, 0.0)
    assert torch.allclose(out.target, v + scale[:, None] * (v_c - v_u), atol=1e-12)
    assert inside.any() and (~inside).any()
    assert torch.equal(out.target[~inside], v[~inside])


def test_masks_are_per_sample_and_guidance_draws_follow_their_laws():
    model = imf_model("mlp", guidance=True)
    x, y = batch(model, n=16)
    loss = imf_loss(ratio=0.5, class_dropout=0.25, omega_max=8.0)
    generator = torch.Generator().manual_seed(0)
    masks, dropped, omegas = [], [], []
    for _ in range(400):
        d = loss.draw(model, x, y, generator)
        g = d.guidance
        flow = ~d.times.mask
        assert torch.all(g.t_min[flow] == 0) and torch.all(g.t_max[flow] == 1)
        jvp = d.times.mask & ~d.dropped
        assert torch.all(g.t_min[jvp] <= 0.5) and torch.all(g.t_max[jvp] >= 0.5)
        assert torch.all(g.omega[d.dropped] == 1)
        masks.append(d.times.mask)
        dropped.append(d.dropped)
        omegas.append(g.omega[~d.dropped])
    mask, drop = torch.stack(masks).double(), torch.stack(dropped).double()
    # Every row position is as likely as any other to have r != t or a dropped label (not the
    # leading rows), and the two masks are independent.
    assert torch.allclose(mask.mean(0), torch.full((16,), 0.5, dtype=F64), atol=0.1)
    assert torch.allclose(drop.mean(0), torch.full((16,), 0.25, dtype=F64), atol=0.1)
    assert abs((mask * drop).mean() - mask.mean() * drop.mean()) < 0.02
    # omega is log-uniform on [1, 8]: log(omega) / log(8) is uniform on [0, 1].
    u = torch.cat(omegas).log() / torch.log(torch.tensor(8.0, dtype=F64))
    assert u.min() >= 0 and u.max() <= 1
    assert abs(u.mean().item() - 0.5) < 0.03 and abs(u.var().item() - 1 / 12) < 0.01


@pytest.mark.parametrize("beta", [0.0, 2.5])
def test_omega_follows_the_power_law_of_its_exponent(beta):
    """p(omega) ~ omega^-beta on [1, 8]: the empirical CDF of the draws against the closed form."""
    loss = imf_loss(omega_max=8.0, omega_power=beta)
    model = imf_model("mlp", guidance=True)
    x, y = batch(model, n=16)
    generator = torch.Generator().manual_seed(0)
    draws = [loss.draw(model, x, y, generator) for _ in range(300)]
    omega = torch.cat([d.guidance.omega[~d.dropped] for d in draws]).sort().values
    a = 1 - beta
    cdf = (omega**a - 1) / (8.0**a - 1)
    empirical = torch.arange(1, len(omega) + 1, dtype=F64) / len(omega)
    assert len(omega) > 3000 and (cdf - empirical).abs().max() < 1.36 / len(omega) ** 0.5  # KS at 5 %


def test_fused_and_nograd_give_the_same_loss_and_gradients():
    model = imf_model("unet", guidance=True)
    x, y = batch(model)
    grads = []
    for mode in ("fused", "nograd"):
        model.zero_grad()
        _, out = terms(imf_loss(jvp=mode), model, x, y)
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-10)


def reference_imf_loss(model: RowTangentModel, x: Tensor, draws, c: float, p: float) -> Tensor:
    """iMF's loss computed the plain way: every row through every pass, the JVP by torch.func.jvp
    on the whole batch, v_c and v_u on every row."""
    t, r, y, g = draws.times.t, draws.times.r, draws.y, draws.guidance
    shape = (-1,) + (1,) * (x.ndim - 1)
    z = (1 - t.view(shape)) * x + t.view(shape) * draws.noise
    v = draws.noise - x
    with torch.no_grad():
        if g is None:
            v_hat, target = model.velocity(z, t, y), v
        else:
            null = torch.full_like(y, CLASSES)
            plain = GuidanceInputs.constant(len(x), 1.0, (0.0, 1.0), x.device, x.dtype)
            v_hat = model.velocity(z, t, y, velocity_inputs(g, t))
            v_u = model.velocity(z, t, null, plain)
            inside = (t >= g.t_min) & (t <= g.t_max) & ~draws.dropped
            target = v + torch.where(inside, 1 - 1 / g.omega, 0.0).view(shape) * (v_hat - v_u)
        _, dudt = torch.func.jvp(
            lambda z_, t_, r_: model(z_, t_, r_, y, g),
            (z, t, r),
            (v_hat, torch.ones_like(t), torch.zeros_like(r)),
        )
    u, v_pred = model.forward_heads(z, t, r, y, g)
    compound = u + (t - r).view(shape) * dudt
    total = torch.zeros((), dtype=x.dtype)
    for prediction in (compound, v_pred):
        delta = (prediction - target).square().flatten(1).sum(1)
        total = total + (delta / (delta.detach() + c) ** p).mean()
    return total


@pytest.mark.parametrize("guidance", [False, True])
def test_restricted_passes_match_a_reference_that_runs_every_row(guidance):
    """The step computes v_hat and the tangent on the r != t rows only, and v_c, v_u only where
    the guided target needs them: the same loss and gradients as computing everything on every row.
    (jvp=nograd gives the fused mode's: test_fused_and_nograd_give_the_same_loss_and_gradients.)"""
    model = imf_model("unet", guidance)
    x, y = batch(model, n=16)
    loss = imf_loss(jvp="fused", weight_p=1.0, weight_c=0.01, class_dropout=0.25)
    draws = loss.draw(model, x, y, torch.Generator().manual_seed(5))
    if guidance:  # the draw has rows the restricted passes leave out, and rows they keep
        g, t = draws.guidance, draws.times.t
        unguided = (t < g.t_min) | (t > g.t_max) | draws.dropped
        assert unguided.any() and (~unguided).any() and (unguided & draws.times.mask).any()
    grads = []
    for compute in (
        lambda: loss.terms_of(model, x, draws).loss,
        lambda: reference_imf_loss(model, x, draws, 0.01, 1.0),
    ):
        model.zero_grad()
        value = compute()
        value.backward()
        grads.append(
            (value.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        )
    (loss_value, grad), (reference_value, reference_grad) = grads
    assert torch.allclose(loss_value, reference_value, rtol=1e-10, atol=0)
    assert grad.shape == reference_grad.shape
    assert torch.allclose(grad, reference_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_velocity_pass_runs_only_the_rows_the_target_needs(dropout):
    """With guidance inputs the no-grad pass runs v_c on the r != t rows (the tangent), v_u on the
    guided rows, and v_c on the guided r = t rows only where the step's forward draws dropout masks
    (else the forward's v-head computes it on the same inputs)."""
    cfg, shape = ARCHS["unet"]
    cfg = cfg.model_copy(update={"v_head": 1, "guidance_inputs": True, "dropout": dropout})
    torch.manual_seed(0)
    model = build_model(cfg, shape, CLASSES).double().train()
    x, y = batch(model, n=16)
    loss = imf_loss(class_dropout=0.25)
    draws = loss.draw(model, x, y, torch.Generator().manual_seed(5))
    seen = []
    hook = model.v_conv_out.register_forward_hook(
        lambda module, args, out: None if torch.is_grad_enabled() else seen.append(len(out))
    )
    loss.terms_of(model, x, draws)
    hook.remove()
    g, t, mask = draws.guidance, draws.times.t, draws.times.mask
    guided = (t >= g.t_min) & (t <= g.t_max) & ~draws.dropped & (g.omega > 1)
    assert (guided & ~mask).any() and (~guided).any()
    expected = int(mask.sum()) + int(guided.sum()) + (int((guided & ~mask).sum()) if dropout else 0)
    assert seen == [expected]


def test_imf_needs_a_velocity_head():
    cfg, shape = ARCHS["mlp"]
    model = build_model(cfg, shape).double()
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="model.v_head >= 1"):
        imf_loss().draw(model, x, None, torch.Generator())


def test_sampling_runs_neither_the_velocity_head_nor_changes_u():
    model = imf_model("dit", guidance=False)
    x, _ = batch(model)
    t = torch.rand(len(x), dtype=F64)
    calls = []
    hook = model.v_final.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        u = model(x, t, t * 0.5)
        u_heads, _ = model.forward_heads(x, t, t * 0.5)
    hook.remove()
    assert len(calls) == 1  # forward_heads ran it once; forward did not
    assert torch.equal(u, u_heads)


def test_interpolation_convention():
    x, noise, t = torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([0.25, 1.0])
    assert torch.equal(interpolate(x, noise, t), expand_time(t, x).expand(2, 2))


def test_an_ode_velocity_is_queried_as_r_equals_t_rows_train_and_a_jump_with_its_interval():
    """r = t rows train with the interval [0, 1]: an ODE solver's velocity at t gets omega where t
    lies in the asked interval and 1 elsewhere, over [0, 1]; a jump (r < t) sees the interval."""
    model = imf_model("mlp", guidance=True)
    x, y = batch(model)
    asked = Guidance(3.0, (0.6, 0.7))

    def direct(t: float, r: float, omega: float, interval: tuple[float, float]) -> Tensor:
        times = torch.full((len(x),), t, dtype=F64)
        inputs = GuidanceInputs.constant(len(x), omega, interval, x.device, F64)
        return model(x, times, torch.full_like(times, r), y, inputs)

    with torch.no_grad():
        for t, omega in ((0.5, 1.0), (0.65, 3.0)):
            times = torch.full((len(x),), t, dtype=F64)
            got = guided_prediction(model, x, times, times, y, asked)
            assert torch.equal(got, direct(t, t, omega, (0.0, 1.0)))
        times, r = torch.full((len(x),), 0.9, dtype=F64), torch.full((len(x),), 0.2, dtype=F64)
        assert torch.equal(guided_prediction(model, x, times, r, y, asked), direct(0.9, 0.2, 3.0, (0.6, 0.7)))
