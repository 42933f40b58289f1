"""Generating samples from a FlowModel, from noise at t = 1 to data at t = 0 (zoo.flow).

    sample_meanflow: k average-velocity jumps z_r = z_t - (t - r) u(z_t, t, r); 1 step is
                     x = eps - u(eps, 1, 0), the 1-NFE sample.
    sample_ode:      an ODE solver on dz/dt = u(z, t, t), the instantaneous velocity (what a
                     flow-matching model learns; a MeanFlow model gives it at r = t).

Both use exactly the model inputs that training used.  Classifier-free guidance with
scale w: u = u_null + w (u_cond - u_null), from one batched model call of size 2B; w = 1 is the
plain conditional prediction (one call of size B).  A model conditioned on guidance (iMF's
model.guidance_inputs) is instead asked for scale w on the interval [t_min, t_max] (default
[0, 1]) in one call of size B: guidance is then chosen at sampling time without retraining.

The caller runs these under torch.no_grad() (or inference_mode) with model.eval(): the samplers
change neither, so they also serve inside differentiable code if ever needed.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from zoo.config.schema import GUIDANCE_INTERVAL_SPLIT, EvalConfig
from zoo.flow import step_average_velocity
from zoo.models.base import FlowModel
from zoo.models.embeddings import GuidanceInputs
from zoo.solvers.ode import Solver, get_solver, grid_points, integrate, time_grid, time_vector


@dataclass(frozen=True)
class Guidance:
    """A guidance scale, and for guidance-conditioned models the interval of times it acts on."""

    scale: float = 1.0
    interval: tuple[float, float] | None = None  # None: [0, 1]


def as_guidance(guidance: "float | Guidance") -> Guidance:
    return guidance if isinstance(guidance, Guidance) else Guidance(float(guidance))


def sampler_guidance(cfg: EvalConfig, scale: float | None = None) -> Guidance:
    """The guidance a run's evaluation samples with: eval.guidance (or `scale`, one of a sweep's)
    on eval.guidance_interval."""
    interval = None if cfg.guidance_interval is None else tuple(cfg.guidance_interval)
    return Guidance(cfg.guidance if scale is None else scale, interval)


def check_guidance(model: FlowModel, guidance: Guidance, omega_max: float | None = None) -> None:
    """Guidance a model can take, or a ValueError saying what to change.

    omega_max: the largest scale a guidance-conditioned model was trained on (loss.omega_max);
    given, the model was trained by iMF and its interval must also be one iMF draws, [a, b] with
    a <= GUIDANCE_INTERVAL_SPLIT <= b: a jump feeds the interval to the network, which would
    extrapolate elsewhere.  (An ODE solver only asks whether each time lies in it, so any interval
    would do there; the rule holds for every sampler because one interval serves all of a run's.)"""
    if guidance.scale != 1.0 and model.num_classes == 0:
        raise ValueError(
            f"guidance {guidance.scale:g} needs a class-conditional model; this one is unconditional"
        )
    if guidance.interval is not None:
        low, high = guidance.interval
        if not model.guidance_conditioned:
            raise ValueError(
                "a guidance interval needs a model conditioned on guidance (trained with "
                "model.guidance_inputs=true); leave the interval out for classifier-free guidance"
            )
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"the guidance interval must satisfy 0 <= a <= b <= 1, got {low:g},{high:g}")
        split = GUIDANCE_INTERVAL_SPLIT
        if omega_max is not None and not low <= split <= high:
            raise ValueError(
                f"this model was trained on guidance intervals a,b with a <= {split:g} <= b; "
                f"got {low:g},{high:g}, choose one such as 0.2,0.8"
            )
    if model.guidance_conditioned:
        top = f"{omega_max:g}" if omega_max is not None else "its loss.omega_max"
        if guidance.scale < 1.0 or (omega_max is not None and guidance.scale > omega_max):
            raise ValueError(
                f"this model was trained on guidance scales in [1, {top}]; got {guidance.scale:g}, "
                "choose one in that range"
            )


def resolve_guidance(
    model: FlowModel,
    eval_cfg: EvalConfig,
    scale: float | None,
    interval: tuple[float, float] | None,
    omega_max: float | None = None,
) -> Guidance:
    """The guidance to sample with: the scale and interval asked for, else the run's evaluation
    settings (an unconditional model: none), checked against the model (check_guidance)."""
    default = sampler_guidance(eval_cfg)
    if scale is None:
        scale = default.scale if model.num_classes else 1.0
    if interval is None and model.guidance_conditioned:
        interval = default.interval
    guidance = Guidance(scale, interval)
    check_guidance(model, guidance, omega_max)
    return guidance


def guided_prediction(
    model: FlowModel, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None, guidance: "float | Guidance"
) -> Tensor:
    """u(z, t, r | y) with guidance scale `guidance` (1 = no guidance): classifier-free, or as the
    model's input where it is conditioned on guidance."""
    guidance = as_guidance(guidance)
    if model.num_classes > 0 and y is None:
        raise ValueError(
            f"the model is class-conditional ({model.num_classes} classes): pass labels y, "
            f"or y filled with model.null_class = {model.null_class} for unconditional samples"
        )
    if model.num_classes == 0 and y is not None:
        raise ValueError("the model is unconditional (num_classes = 0): pass y=None")
    if model.guidance_conditioned:
        interval = guidance.interval or (0.0, 1.0)
        inputs = GuidanceInputs.constant(z.shape[0], guidance.scale, interval, z.device, t.dtype)
        if torch.equal(t, r):  # an ODE solver's velocity: queried as r = t rows are trained
            inputs = inputs.at(t)
        return model(z, t, r, y, inputs)
    if guidance.interval is not None:
        raise ValueError("a guidance interval needs a model conditioned on guidance (model.guidance_inputs)")
    if guidance.scale == 1.0:
        return model(z, t, r, y)
    if y is None:
        raise ValueError(f"guidance={guidance.scale} needs a class-conditional model; use guidance=1.0")
    null = torch.full_like(y, model.null_class)
    both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([r, r]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance.scale * (cond - uncond)


def as_grid(steps: int | Tensor | Sequence[float]) -> list[float]:
    return grid_points(time_grid(steps) if isinstance(steps, int) else steps)


def sample_meanflow(
    model: FlowModel,
    noise: Tensor,
    steps: int | Tensor | Sequence[float],
    y: Tensor | None = None,
    guidance: "float | Guidance" = 1.0,
) -> Tensor:
    """MeanFlow sampling over `steps` even steps from 1 to 0, or over an explicit decreasing grid."""
    points = as_grid(steps)
    if points[0] < points[-1]:
        raise ValueError(f"a MeanFlow grid runs from noise (t=1) down to data (t=0), got {points}")
    z = noise
    for t, r in zip(points[:-1], points[1:], strict=True):
        t_vec, r_vec = time_vector(z, t), time_vector(z, r)
        z = step_average_velocity(z, guided_prediction(model, z, t_vec, r_vec, y, guidance), t_vec, r_vec)
    return z


def sample_ode(
    model: FlowModel,
    noise: Tensor,
    solver: str | Solver,
    steps: int | Tensor | Sequence[float],
    y: Tensor | None = None,
    guidance: "float | Guidance" = 1.0,
) -> Tensor:
    """Integrate dz/dt = u(z, t, t) from 1 to 0; NFE = steps * solver.calls_per_step
    (use zoo.solvers.steps_for_nfe to go from an NFE budget to steps)."""
    solver = get_solver(solver) if isinstance(solver, str) else solver

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        return guided_prediction(model, z, t, t, y, guidance)

    return integrate(solver, velocity, noise, as_grid(steps))
