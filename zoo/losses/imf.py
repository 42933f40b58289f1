"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter, He 2025) in zoo's time convention (zoo.flow).

    z = (1 - t) x + t eps,  t and r logit-normal, t = max, r = min, r = t on a random fraction
    v_hat = sg(v_theta(z, t))          the model's own instantaneous velocity: its v-head at r = t
    (u, du/dt) = JVP of u(z, t, r) along (v_hat, 1, 0) for (z, t, r)
    V = u + (t - r) sg(du/dt)          the compound velocity, which should equal the velocity at t
    D_u = sum over dims of (V - sg(v_g))^2,   D_v = sum over dims of (v_theta(z, t, r) - sg(v_g))^2
    loss = mean(D_u / sg(D_u + c)^p) + mean(D_v / sg(D_v + c)^p)

The v-head runs in the same forward as u, conditioned on the same (t, r); its target does not
depend on r, so it learns the velocity at t for every r and is queried at r = t for v_hat.

Guidance as a condition (a class-conditional model built with model.guidance_inputs): each sample
draws omega from p(omega) ~ omega ** -omega_power on [1, omega_max] (log-uniform at power 1) and an
interval t_min ~ U(0, 1/2), t_max ~ U(1/2, 1) ([0, 1] where r = t; omega = 1 where the label was
dropped), and the model sees them.  The target is

    v_g = (eps - x) + (1 - 1/omega) (v_c - v_u)   for t in [t_min, t_max], else eps - x
    v_c = sg(v_theta(z, t | y, omega_t, [0, 1])),  v_u = sg(v_theta(z, t | null, omega = 1, [0, 1]))
    omega_t = omega for t in [t_min, t_max], else 1

The velocity at t (r = t, as v_hat and v_c are queried) depends on the interval only through
whether guidance acts at t, so it is queried as the r = t rows are trained: over [0, 1], with the
row's omega where t lies in its interval and 1 elsewhere (never at an interval r = t rows never see).

Why 1 - 1/omega: if the v-head has learnt the guided field V = v_u* + omega (v_c* - v_u*) of the true
conditional and unconditional fields v_c*, v_u*, and the null class (always trained at omega = 1)
has learnt v_u*, then E[v_g | z] = v_c* + (1 - 1/omega) omega (v_c* - v_u*) = V: the guided field is
the target's fixed point.  v_hat is v_c, the guided velocity the u-head averages.

Cost in forward passes F (fused mode, k = ratio * B rows with r != t): v_hat needs a no-grad
forward of trunk + v-head on the k rows; then one grad forward of both heads carrying the k rows'
tangent, and its backward.  With guidance inputs the no-grad forward also computes what v_g needs
and nothing more.  v_g is eps - x where the scale is 0, so v_u runs on the guided rows only
(labelled, omega > 1, t in the interval, as every labelled r = t row is).  v_c is the tangent on
the k rows; on a guided r = t row the step's forward runs the v-head on v_c's very inputs (r = t,
the interval [0, 1]), so its output, detached, is v_c there (unless the model draws dropout
masks: the target would then share the prediction's mask, and the no-grad forward computes v_c
there too).  At the paper's settings (k = B/2, 10 % label dropout, t ~ logit-normal(-0.4, 1))
that is about 0.5B + 0.77B rows, not 2B.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoo.config.schema import GUIDANCE_INTERVAL_SPLIT, LossConfig
from zoo.flow import conditional_velocity, expand_time, interpolate
from zoo.losses.base import Draws, Loss, draw_noise, drop_labels
from zoo.losses.jvp import build_jvp, select
from zoo.losses.time_sampling import TimePair, sample_t_r
from zoo.models.base import FlowModel, RowTangentModel
from zoo.models.embeddings import GuidanceInputs


def power_law(u: Tensor, high: float, beta: float) -> Tensor:
    """Inverse CDF of p(omega) proportional to omega ** -beta on [1, high] at u in [0, 1]
    (beta = 1: log-uniform, beta = 0: uniform, larger beta: more mass near 1)."""
    if beta == 1.0:
        return high**u
    a = 1.0 - beta
    return (1.0 + u * (high**a - 1.0)) ** (1.0 / a)


def draw_guidance(
    cfg: LossConfig, times: TimePair, dropped: Tensor, generator: torch.Generator, dtype: torch.dtype
) -> GuidanceInputs:
    """Per-sample omega and interval (see the module docstring)."""
    batch, device = times.t.shape[0], generator.device
    draws = torch.rand((3, batch), generator=generator, device=device, dtype=dtype)
    omega = power_law(draws[0], cfg.omega_max, cfg.omega_power)
    split = GUIDANCE_INTERVAL_SPLIT
    t_min, t_max = split * draws[1], split + (1.0 - split) * draws[2]
    whole = ~times.mask | dropped  # r = t rows, and rows without a class: guidance on all of [0, 1]
    return GuidanceInputs(
        omega=torch.where(dropped, torch.ones_like(omega), omega),
        t_min=torch.where(whole, torch.zeros_like(t_min), t_min),
        t_max=torch.where(whole, torch.ones_like(t_max), t_max),
    )


def adaptive_mean(delta: Tensor, c: float, p: float) -> tuple[Tensor, Tensor]:
    """(mean(w delta), w) with w = 1 / sg(delta + c)^p."""
    weight = (delta.detach() + c).pow(-p)
    return (weight * delta).mean(), weight


@dataclass
class ImfTerms:
    """Everything one loss evaluation computed, for tests and diagnostics."""

    z: Tensor
    target: Tensor  # v_g (eps - x without guidance), detached
    tangent: Tensor  # (k, ...) the JVP's z-tangent on times.jvp_index, detached
    u: Tensor  # with grad
    dudt: Tensor  # detached; zero where r = t
    compound: Tensor  # V = u + (t - r) sg(du/dt), with grad
    v: Tensor  # the v-head's prediction, with grad
    delta_u: Tensor  # (B,)
    delta_v: Tensor  # (B,)
    loss: Tensor


@dataclass
class GuidedRows:
    """What the guided target takes from the no-grad velocity pass (all without grad)."""

    rows: Tensor  # (g,) the guided rows: scale 1 - 1/omega != 0 at their t
    scale: Tensor  # (g,)
    v_u: Tensor  # (g, ...) the unconditional velocity on them
    cond_rows: Tensor  # (c,) the rows whose v_c the pass computed: the tangent rows, then others
    v_c: Tensor  # (c, ...)

    def target(self, v: Tensor, v_head: Tensor) -> Tensor:
        """v_g = v + scale (v_c - v_u) on the guided rows, v elsewhere; v_c from the pass where it
        ran, else the step's v-head output (detached), which the pass left those rows to."""
        with torch.no_grad():
            v_c = v_head.detach().to(v.dtype).index_copy(0, self.cond_rows, self.v_c)[self.rows]
            lift = expand_time(self.scale.to(v.dtype), self.v_u) * (v_c - self.v_u)
            return v.index_add(0, self.rows, lift)


def draws_dropout(model: FlowModel) -> bool:
    """Whether a forward of `model` draws dropout masks (two forwards of one row then differ)."""
    return model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


class ImprovedMeanFlowLoss(Loss):
    name = "imf"

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.jvp = build_jvp(cfg.jvp, cfg.jvp_precision, cfg.jvp_kernels)

    def draw(self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator) -> Draws:
        check_imf_model(model)
        batch = x.shape[0]
        noise = draw_noise(x, generator)
        times = sample_t_r(batch, self.cfg, generator, dtype=x.dtype)
        y, dropped = drop_labels(model, y, self.cfg.class_dropout, batch, generator)
        guidance = None
        if model.guidance_conditioned:
            guidance = draw_guidance(self.cfg, times, dropped, generator, x.dtype)
        return Draws(noise=noise, times=times, y=y, dropped=dropped, guidance=guidance)

    def velocity_pass(
        self, model: RowTangentModel, z: Tensor, t: Tensor, draws: Draws
    ) -> tuple[Tensor, GuidedRows | None]:
        """The no-grad forward before the step's forward: (the tangent rows v_hat, what the guided
        target needs from it, None without guidance inputs)."""
        ji, y, guidance = draws.times.jvp_index, draws.y, draws.guidance
        with torch.no_grad():
            if guidance is None:
                return model.velocity(z[ji], t[ji], select(y, ji)).to(z.dtype), None
            inside = (t >= guidance.t_min) & (t <= guidance.t_max) & ~draws.dropped
            scale = torch.where(inside, 1 - 1 / guidance.omega, torch.zeros_like(guidance.omega))
            # Which rows need v_c and v_u: see the module docstring.  nonzero() syncs with the
            # device: the row counts set the shapes.
            guided = scale != 0
            extra = guided & ~draws.times.mask if draws_dropout(model) else torch.zeros_like(guided)
            extra, guided = extra.nonzero().squeeze(1), guided.nonzero().squeeze(1)
            cond = torch.cat([ji, extra])
            null = torch.full_like(guided, model.null_class)
            plain = GuidanceInputs.constant(len(guided), 1.0, (0.0, 1.0), z.device, guidance.omega.dtype)
            rows = torch.cat([cond, guided])
            out = model.velocity(
                z[rows], t[rows], torch.cat([y[cond], null]), guidance.rows(cond).at(t[cond]).cat(plain)
            ).to(z.dtype)
            v_c, v_u = out[: len(cond)], out[len(cond) :]
            return v_c[: len(ji)], GuidedRows(guided, scale[guided], v_u, cond, v_c)

    def terms_of(self, model: FlowModel, x: Tensor, draws: Draws) -> ImfTerms:
        cfg = self.cfg
        dtype = torch.promote_types(x.dtype, torch.float32)  # the error in fp32 (fp64 for fp64 data)
        times = draws.times
        t, r = times.t, times.r
        z = interpolate(x, draws.noise, t)
        tangent, guided = self.velocity_pass(model, z, t, draws)
        u, dudt, v = self.jvp.heads(model, z, t, r, draws.y, tangent, times, draws.guidance)
        target = conditional_velocity(x, draws.noise)
        if guided is not None:
            target = guided.target(target, v)
        target = target.to(dtype)
        compound = u.to(dtype) + expand_time(t - r, u).to(dtype) * dudt.to(dtype)
        delta_u = (compound - target).square().flatten(1).sum(1)
        delta_v = (v.to(dtype) - target).square().flatten(1).sum(1)
        loss_u, _ = adaptive_mean(delta_u, cfg.weight_c, cfg.weight_p)
        loss_v, _ = adaptive_mean(delta_v, cfg.weight_c, cfg.weight_p)
        return ImfTerms(
            z=z,
            target=target,
            tangent=tangent,
            u=u,
            dudt=dudt,
            compound=compound,
            v=v,
            delta_u=delta_u,
            delta_v=delta_v,
            loss=loss_u + loss_v,
        )

    def evaluate(self, model: FlowModel, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.terms_of(model, x, draws)
        dim = math.prod(x.shape[1:])
        delta_u, delta_v = terms.delta_u.detach(), terms.delta_v.detach()
        metrics = {
            "loss": terms.loss.detach(),
            "mse": delta_u.mean() / dim,
            "u_mse": delta_u.mean() / dim,
            "v_mse": delta_v.mean() / dim,
            "max_sample_mse": torch.maximum(delta_u.max(), delta_v.max()) / dim,
        }
        return terms.loss, metrics


def check_imf_model(model: FlowModel) -> None:
    if not isinstance(model, RowTangentModel) or not model.has_v_head:
        raise ValueError(
            "loss.kind=imf trains an auxiliary velocity head: build the model with model.v_head >= 1 "
            "(e.g. model.v_head=1)"
        )
