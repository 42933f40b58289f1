"""The MeanFlow loss (Geng et al. 2025) in zoo's time convention (zoo.flow).

    z = (1 - t) x + t eps,  v = eps - x   (or the guided v_g, below)
    (u, du/dt) = JVP of u(z, t, r) along (v, 1, 0) for (z, t, r)
    u_tgt = sg(v - (t - r) du/dt)
    Delta = sum over non-batch dims of (u - u_tgt)^2 ;  w = 1 / sg(Delta + c)^p ;  loss = mean(w Delta)

Training-time guidance (class-conditional models, omega != 1 or kappa != 0):
    v_g = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)
computed without grad, used for t in [guidance_t_min, guidance_t_max] and not for samples whose
label was dropped (those keep v).  v_g is both the JVP's z-tangent and the target's velocity, since
the field the model learns to average is the guided one.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from zoo.config.schema import LossConfig
from zoo.flow import conditional_velocity, expand_time, interpolate
from zoo.losses.base import Draws, Loss, draw_noise, drop_labels
from zoo.losses.jvp import build_jvp
from zoo.losses.time_sampling import TimePair, sample_t_r
from zoo.models.base import FlowModel


@dataclass
class MeanFlowTerms:
    """Everything one loss evaluation computed, for tests and diagnostics."""

    noise: Tensor
    times: TimePair
    y: Tensor | None  # labels as the model saw them (after dropout)
    dropped: Tensor  # (B,) bool
    z: Tensor
    v: Tensor  # the velocity used as tangent and target (guided where guidance applies)
    u: Tensor  # prediction, compute dtype, with grad
    dudt: Tensor  # detached
    target: Tensor  # detached
    delta: Tensor  # (B,) squared error summed over non-batch dims, with grad
    weight: Tensor  # (B,) detached adaptive weight
    loss: Tensor


class MeanFlowLoss(Loss):
    name = "meanflow"

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        if cfg.guidance_t_min > cfg.guidance_t_max:
            raise ValueError(
                f"guidance_t_min ({cfg.guidance_t_min}) must not exceed guidance_t_max ({cfg.guidance_t_max})"
            )
        self.jvp = build_jvp(cfg.jvp, cfg.jvp_precision, cfg.jvp_kernels)

    @property
    def guidance_active(self) -> bool:
        return self.cfg.guidance_omega != 1.0 or self.cfg.guidance_kappa != 0.0

    def guided_velocity(
        self, model: FlowModel, z: Tensor, t: Tensor, v: Tensor, y: Tensor, dropped: Tensor
    ) -> Tensor:
        cfg = self.cfg
        null = torch.full_like(y, model.null_class)
        with torch.no_grad():
            if cfg.guidance_kappa == 0.0:
                # The conditional prediction has weight 0: one B-sized call instead of 2B.
                u_uncond = model(z, t, t, null).to(v.dtype)
                guided = cfg.guidance_omega * v + (1.0 - cfg.guidance_omega) * u_uncond
            else:
                both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, null]))
                u_cond, u_uncond = both.to(v.dtype).chunk(2)
                guided = (
                    cfg.guidance_omega * v
                    + cfg.guidance_kappa * u_cond
                    + (1.0 - cfg.guidance_omega - cfg.guidance_kappa) * u_uncond
                )
        inside = (t >= cfg.guidance_t_min) & (t <= cfg.guidance_t_max) & ~dropped
        return torch.where(expand_time(inside, v), guided, v)

    def draw(self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator) -> Draws:
        batch = x.shape[0]
        noise = draw_noise(x, generator)
        times = sample_t_r(batch, self.cfg, generator, dtype=x.dtype)
        y, dropped = drop_labels(model, y, self.cfg.class_dropout, batch, generator)
        if self.guidance_active and y is None:
            raise ValueError(
                "training-time guidance (guidance_omega != 1 or guidance_kappa != 0) needs a "
                "class-conditional model; set loss.guidance_omega = 1 and guidance_kappa = 0"
            )
        return Draws(noise=noise, times=times, y=y, dropped=dropped)

    def terms(
        self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator
    ) -> MeanFlowTerms:
        return self.terms_of(model, x, self.draw(model, x, y, generator))

    def terms_of(self, model: FlowModel, x: Tensor, draws: Draws) -> MeanFlowTerms:
        cfg = self.cfg
        # fp32 arithmetic for the target and error (fp64 when the data is fp64, as in tests).
        dtype = torch.promote_types(x.dtype, torch.float32)
        noise, times, y, dropped = draws.noise, draws.times, draws.y, draws.dropped
        t, r = times.t, times.r
        z = interpolate(x, noise, t)
        v = conditional_velocity(x, noise)
        if self.guidance_active:
            v = self.guided_velocity(model, z, t, v, y, dropped)
        u, dudt = self.jvp(model, z, t, r, y, v, times)
        u = u.to(dtype)
        target = (v.to(dtype) - expand_time(t - r, v).to(dtype) * dudt.to(dtype)).detach()
        delta = (u - target).square().flatten(1).sum(1)
        weight = (delta.detach() + cfg.weight_c).pow(-cfg.weight_p)
        loss = (weight * delta).mean()
        return MeanFlowTerms(
            noise=noise,
            times=times,
            y=y,
            dropped=dropped,
            z=z,
            v=v,
            u=u,
            dudt=dudt.detach(),
            target=target,
            delta=delta,
            weight=weight,
            loss=loss,
        )

    def evaluate(self, model: FlowModel, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.terms_of(model, x, draws)
        dim = math.prod(x.shape[1:])
        metrics = {
            "loss": terms.loss.detach(),
            "mse": terms.delta.detach().mean() / dim,
            "weight": terms.weight.mean(),
        }
        return terms.loss, metrics
