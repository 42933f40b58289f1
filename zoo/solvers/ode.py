"""Fixed-step ODE solvers for dz/dt = f(z, t), integrated from t = 1 (noise) to t = 0 (data).

The step h = t_next - t is negative along zoo's direction; the formulas are the textbook ones in
h, so a constant field c gives z(0) = z(1) - c exactly.  `integrate` takes exactly len(grid) - 1
steps (not N + 1 for "N steps"), and every step of a solver
makes exactly `calls_per_step` calls of f, the last one included, so NFE = steps * calls_per_step.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# f(z, t) -> dz/dt, with t a (B,) tensor of one repeated time.
VelocityField = Callable[[Tensor, Tensor], Tensor]


def time_vector(z: Tensor, t: float) -> Tensor:
    return torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype)


class Solver(ABC):
    name: str
    calls_per_step: int
    order: int

    @abstractmethod
    def step(self, f: VelocityField, z: Tensor, t: float, t_next: float) -> Tensor:
        """z at t_next from z at t."""


class Euler(Solver):
    name, calls_per_step, order = "euler", 1, 1

    def step(self, f, z, t, t_next):
        return z + (t_next - t) * f(z, time_vector(z, t))


class Midpoint(Solver):
    name, calls_per_step, order = "midpoint", 2, 2

    def step(self, f, z, t, t_next):
        h = t_next - t
        k1 = f(z, time_vector(z, t))
        return z + h * f(z + 0.5 * h * k1, time_vector(z, t + 0.5 * h))


class Heun(Solver):
    """Explicit trapezoid; always 2 calls, also on the last step (no Euler shortcut at t = 0)."""

    name, calls_per_step, order = "heun", 2, 2

    def step(self, f, z, t, t_next):
        h = t_next - t
        k1 = f(z, time_vector(z, t))
        k2 = f(z + h * k1, time_vector(z, t_next))
        return z + 0.5 * h * (k1 + k2)


class RK4(Solver):
    name, calls_per_step, order = "rk4", 4, 4

    def step(self, f, z, t, t_next):
        h = t_next - t
        k1 = f(z, time_vector(z, t))
        k2 = f(z + 0.5 * h * k1, time_vector(z, t + 0.5 * h))
        k3 = f(z + 0.5 * h * k2, time_vector(z, t + 0.5 * h))
        k4 = f(z + h * k3, time_vector(z, t_next))
        return z + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (Euler, Midpoint, Heun, RK4)}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; use one of {sorted(SOLVERS)}")
    return SOLVERS[name]()


def time_grid(n_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """n_steps + 1 evenly spaced times from t_start to t_end (float64, CPU)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    return torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64)


def grid_points(grid: Tensor | Sequence[float]) -> list[float]:
    """A time grid as Python floats (one host copy), checked: >= 2 points, strictly monotone."""
    points = grid.tolist() if isinstance(grid, Tensor) else [float(g) for g in grid]
    if len(points) < 2:
        raise ValueError(f"a time grid needs at least 2 points (1 step), got {len(points)}")
    steps = [b - a for a, b in zip(points[:-1], points[1:], strict=True)]
    if not (all(s < 0 for s in steps) or all(s > 0 for s in steps)):
        raise ValueError(f"a time grid must be strictly monotone, got {points}")
    return points


def integrate(solver: Solver, f: VelocityField, z: Tensor, grid: Tensor | Sequence[float]) -> Tensor:
    """Exactly len(grid) - 1 solver steps along the grid."""
    points = grid_points(grid)
    for t, t_next in zip(points[:-1], points[1:], strict=True):
        z = solver.step(f, z, t, t_next)
    return z


def steps_for_nfe(solver: Solver, nfe: int) -> int:
    """Steps that spend exactly `nfe` function evaluations."""
    if nfe < solver.calls_per_step or nfe % solver.calls_per_step:
        raise ValueError(
            f"{solver.name} makes {solver.calls_per_step} model calls per step, so its NFE must be "
            f"a positive multiple of {solver.calls_per_step}; got {nfe}"
        )
    return nfe // solver.calls_per_step
