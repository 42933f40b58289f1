"""Fixed-step solvers: exact step and call counts, exact constant fields, convergence orders."""

import math

import pytest
import torch
from torch import Tensor

from zoo.solvers import RK4, Euler, Heun, Midpoint, Solver, get_solver, integrate, steps_for_nfe, time_grid

F64 = torch.float64
SOLVERS = [Euler(), Midpoint(), Heun(), RK4()]
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


class Counted:
    """A velocity field that counts its calls and records the times it was asked about."""

    def __init__(self, field) -> None:
        self.field = field
        self.calls = 0
        self.times: list[float] = []

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (z.shape[0],) and bool((t == t[0]).all())
        self.calls += 1
        self.times.append(t[0].item())
        return self.field(z, t)


def test_time_grid_runs_from_noise_to_data() -> None:
    grid = time_grid(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(1).tolist() == [1.0, 0.0]
    assert time_grid(2, t_start=0.8, t_end=0.2).tolist() == pytest.approx([0.8, 0.5, 0.2])
    with pytest.raises(ValueError, match="n_steps"):
        time_grid(0)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
@pytest.mark.parametrize("n_steps", [1, 2, 7])
def test_exact_steps_calls_and_constant_field(solver: Solver, n_steps: int) -> None:
    c = torch.tensor([0.3, -1.7], dtype=F64)
    f = Counted(lambda z, t: c.expand_as(z))
    z1 = torch.randn(5, 2, dtype=F64)
    z0 = integrate(solver, f, z1, time_grid(n_steps))
    # dz/dt = c from t=1 to t=0: z(0) = z(1) - c, for any number of steps (one step too many: 1 + 1/N).
    torch.testing.assert_close(z0, z1 - c, rtol=0, atol=1e-14)
    assert f.calls == n_steps * solver.calls_per_step
    assert max(f.times) == 1.0


def test_heun_evaluates_the_last_step_endpoint_and_euler_never_does() -> None:
    heun, euler = Counted(lambda z, t: z), Counted(lambda z, t: z)
    z = torch.ones(2, 1, dtype=F64)
    integrate(Heun(), heun, z, time_grid(3))
    integrate(Euler(), euler, z, time_grid(3))
    assert heun.times[-1] == 0.0 and heun.calls == 6
    assert euler.times == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_time_dependent_field_is_integrated_in_the_right_direction() -> None:
    # dz/dt = t: z(0) = z(1) - 1/2, exact for every solver of order >= 2 (and Euler off by h/2).
    f = lambda z, t: t[:, None].expand_as(z)  # noqa: E731
    z1 = torch.zeros(3, 1, dtype=F64)
    for solver in (Midpoint(), Heun(), RK4()):
        torch.testing.assert_close(integrate(solver, f, z1, time_grid(3)), z1 - 0.5)
    torch.testing.assert_close(integrate(Euler(), f, z1, time_grid(4)), z1 - 0.5 - 0.125)


def linear_error(solver: Solver, n_steps: int) -> float:
    a = 1.3
    z1 = torch.tensor([[1.0], [-2.0]], dtype=F64)
    z0 = integrate(solver, lambda z, t: a * z, z1, time_grid(n_steps))
    return (z0 - z1 * math.exp(-a)).abs().max().item()


def rotation_error(solver: Solver, n_steps: int) -> float:
    # dz/dt = J z with J the 90-degree rotation generator: z(0) = exp(-J) z(1), rotation by -1 rad.
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    z1 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    z0 = integrate(solver, lambda z, t: z @ J.T, z1, time_grid(n_steps))
    c, s = math.cos(-1.0), math.sin(-1.0)
    exact = z1 @ torch.tensor([[c, -s], [s, c]], dtype=F64).T
    return (z0 - exact).abs().max().item()


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
@pytest.mark.parametrize("error", [linear_error, rotation_error], ids=["linear", "rotation"])
def test_empirical_order_of_convergence(solver: Solver, error) -> None:
    coarse, fine = error(solver, 16), error(solver, 32)
    order = math.log2(coarse / fine)
    assert abs(order - ORDERS[solver.name]) < 0.25, f"{solver.name}: empirical order {order:.2f}"
    assert fine < coarse


def test_get_solver_and_steps_for_nfe() -> None:
    assert [get_solver(n).calls_per_step for n in ("euler", "midpoint", "heun", "rk4")] == [1, 2, 2, 4]
    with pytest.raises(ValueError, match="unknown solver"):
        get_solver("dopri5")
    assert steps_for_nfe(get_solver("heun"), 8) == 4
    assert steps_for_nfe(get_solver("euler"), 7) == 7
    assert steps_for_nfe(get_solver("rk4"), 8) == 2
    with pytest.raises(ValueError, match="multiple of 4"):
        steps_for_nfe(get_solver("rk4"), 50)
    with pytest.raises(ValueError, match="multiple of 2"):
        steps_for_nfe(get_solver("heun"), 1)


def test_integrate_rejects_bad_grids() -> None:
    f = lambda z, t: z  # noqa: E731
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="at least 2 points"):
        integrate(Euler(), f, z, [1.0])
    with pytest.raises(ValueError, match="monotone"):
        integrate(Euler(), f, z, [1.0, 0.5, 0.7])
    # An explicit uneven grid takes exactly len(grid) - 1 steps.
    counted = Counted(f)
    integrate(RK4(), counted, z, torch.tensor([1.0, 0.9, 0.5, 0.0]))
    assert counted.calls == 3 * 4
