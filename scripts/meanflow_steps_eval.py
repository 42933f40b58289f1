"""1-step vs 2-step (vs 4-step, the model's own ODE, and hybrids) for MeanFlow checkpoints.

    .venv/bin/python scripts/meanflow_steps_eval.py outputs/RUN/last.pt ... [--n 4000] [--seeds 0 1 2]

For each checkpoint (EMA weights) and each noise seed, the energy distance to the run's held-out
data of: MeanFlow 1/2/4-step; the ODE of the model's r = t field (RK4, 25 steps = 100 NFE);
"ode|jump" = ODE from 1 to 0.5 then one MeanFlow jump 0.5 -> 0; "jump|ode" = jump 1 -> 0.5 then
ODE 0.5 -> 0.  Prints means over noise seeds and the paired difference 2-step minus 1-step
(same noise), and the RMS distance of each sampler's points from the ODE's points.
"""

import argparse
import statistics

import torch

from zoo.data import build_data
from zoo.inference import load_model
from zoo.metrics.energy import energy_distance
from zoo.solvers import sample_meanflow, sample_ode


@torch.no_grad()
def samplers(model, noise, quick=False):
    if quick:
        return {f"MF {k}-step": sample_meanflow(model, noise, k) for k in (1, 2, 4)}
    rk_1_half = sample_ode(model, noise, "rk4", torch.linspace(1.0, 0.5, 13, dtype=torch.float64))
    jump_1_half = sample_meanflow(model, noise, [1.0, 0.5])
    out = {
        "MF 1-step": sample_meanflow(model, noise, 1),
        "MF 2-step": sample_meanflow(model, noise, 2),
        "MF 4-step": sample_meanflow(model, noise, 4),
        "ODE rk4x25": sample_ode(model, noise, "rk4", 25),
        "ode|jump": sample_meanflow(model, rk_1_half, [0.5, 0.0]),
        "jump|ode": sample_ode(model, jump_1_half, "rk4", torch.linspace(0.5, 0.0, 13, dtype=torch.float64)),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="MeanFlow 1/2/4-step only (no ODE, no hybrids)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in args.checkpoints:
        loaded = load_model(path, torch.device("cpu"))
        source = build_data(loaded.cfg.data, "cpu", loaded.cfg.seed, batch_size=256)
        held = source.held_out(args.n).float()
        scores: dict[str, list[float]] = {}
        rms: dict[str, list[float]] = {}
        for seed in args.seeds:
            noise = torch.randn(
                args.n, *loaded.model.data_shape, generator=torch.Generator().manual_seed(1000 + seed)
            )
            outs = samplers(loaded.model, noise, args.quick)
            for name, x in outs.items():
                scores.setdefault(name, []).append(energy_distance(x, held).value)
                ref = outs.get("ODE rk4x25", outs["MF 4-step"])
                rms.setdefault(name, []).append((x - ref).flatten(1).square().sum(1).mean().sqrt().item())
        diff = [a - b for a, b in zip(scores["MF 2-step"], scores["MF 1-step"], strict=True)]
        print(f"{path} (step {loaded.step})")
        for name, vals in scores.items():
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            print(
                f"  {name:11s} ED {statistics.mean(vals):.5f} (sd over seeds {sd:.5f})   "
                f"RMS to ODE (--quick: to 4-step) {statistics.mean(rms[name]):.4f}"
            )
        spread = statistics.stdev(diff) if len(diff) > 1 else float("nan")
        print(
            f"  2-step minus 1-step: {statistics.mean(diff):+.5f} sd {spread:.5f} "
            f"(per seed: {', '.join(f'{d:+.5f}' for d in diff)})"
        )


if __name__ == "__main__":
    main()
