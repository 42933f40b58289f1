"""Spread and sharpness of 2-D MeanFlow samples: per-axis std and mean distance to the nearest
held-out point, for MeanFlow 1-step, 2-step and the model's ODE (RK4, 25 steps), next to the data.

    .venv/bin/python scripts/meanflow_sample_spread.py outputs/RUN/last.pt ...
"""

import sys

import torch

from zoo.data import build_data
from zoo.inference import load_model
from zoo.solvers import sample_meanflow, sample_ode


def nearest(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.cdist(a.double(), b.double()).min(1).values.mean().item()


def main() -> None:
    torch.set_num_threads(1)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(7))
    for path in sys.argv[1:]:
        loaded = load_model(path, torch.device("cpu"))
        source = build_data(loaded.cfg.data, "cpu", loaded.cfg.seed, batch_size=256)
        held, ref = source.held_out(4000).float(), source.reference(4000).float()
        print(path)
        print(f"  data        std {held.std(0).numpy().round(3)}  nearest-held-out {nearest(ref, held):.4f}")
        with torch.no_grad():
            outs = {
                "MF 1-step": sample_meanflow(loaded.model, noise, 1),
                "MF 2-step": sample_meanflow(loaded.model, noise, 2),
                "ODE rk4x25": sample_ode(loaded.model, noise, "rk4", 25),
            }
        for name, x in outs.items():
            print(f"  {name:11s} std {x.std(0).numpy().round(3)}  nearest-held-out {nearest(x, held):.4f}")


if __name__ == "__main__":
    main()
