"""Generating samples from a FlowModel, from noise at t = 1 to data at t = 0 (zoo.flow).

    sample_meanflow: k average-velocity jumps z_r = z_t - (t - r) u(z_t, t, r); 1 step is
                     x = eps - u(eps, 1, 0), the 1-NFE sample.
    sample_ode:      an ODE solver on dz/dt = u(z, t, t), the instantaneous velocity (what a
                     flow-matching model learns; a MeanFlow model gives it at r = t).

Both use exactly the model inputs that training used.  Classifier-free guidance with
scale w: u = u_null + w (u_cond - u_null), from one batched model call of size 2B; w = 1 is the
plain conditional prediction (one call of size B).

The caller runs these under torch.no_grad() (or inference_mode) with model.eval(): the samplers
change neither, so they also serve inside differentiable code if ever needed.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from zoo.flow import step_average_velocity
from zoo.models.base import FlowModel
from zoo.solvers.ode import Solver, get_solver, grid_points, integrate, time_grid, time_vector


def guided_prediction(
    model: FlowModel, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None, guidance: float
) -> Tensor:
    """u(z, t, r | y) with classifier-free guidance scale `guidance` (1 = no guidance)."""
    if model.num_classes > 0 and y is None:
        raise ValueError(
            f"the model is class-conditional ({model.num_classes} classes): pass labels y, "
            f"or y filled with model.null_class = {model.null_class} for unconditional samples"
        )
    if model.num_classes == 0 and y is not None:
        raise ValueError("the model is unconditional (num_classes = 0): pass y=None")
    if guidance == 1.0:
        return model(z, t, r, y)
    if y is None:
        raise ValueError(f"guidance={guidance} needs a class-conditional model; use guidance=1.0")
    null = torch.full_like(y, model.null_class)
    both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([r, r]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def as_grid(steps: int | Tensor | Sequence[float]) -> list[float]:
    return grid_points(time_grid(steps) if isinstance(steps, int) else steps)


def sample_meanflow(
    model: FlowModel,
    noise: Tensor,
    steps: int | Tensor | Sequence[float],
    y: Tensor | None = None,
    guidance: float = 1.0,
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
    guidance: float = 1.0,
) -> Tensor:
    """Integrate dz/dt = u(z, t, t) from 1 to 0; NFE = steps * solver.calls_per_step
    (use zoo.solvers.steps_for_nfe to go from an NFE budget to steps)."""
    solver = get_solver(solver) if isinstance(solver, str) else solver

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        return guided_prediction(model, z, t, t, y, guidance)

    return integrate(solver, velocity, noise, as_grid(steps))
