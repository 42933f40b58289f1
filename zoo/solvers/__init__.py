"""ODE solvers and samplers (time runs from t = 1, noise, to t = 0, data; see zoo.flow)."""

from zoo.solvers.ode import (
    RK4,
    SOLVERS,
    Euler,
    Heun,
    Midpoint,
    Solver,
    VelocityField,
    get_solver,
    integrate,
    steps_for_nfe,
    time_grid,
)
from zoo.solvers.samplers import guided_prediction, sample_meanflow, sample_ode

__all__ = [
    "RK4",
    "SOLVERS",
    "Euler",
    "Heun",
    "Midpoint",
    "Solver",
    "VelocityField",
    "get_solver",
    "guided_prediction",
    "integrate",
    "sample_meanflow",
    "sample_ode",
    "steps_for_nfe",
    "time_grid",
]
