"""How sample-dependent MeanFlow's adaptive weight is at fixed (t, r), on a trained checkpoint.

    .venv/bin/python scripts/meanflow_weight_spread.py outputs/RUN/last.pt ... [--n 256]

w = 1 / (Delta + c)^p only reweights *within* a (t, r) cell if Delta varies between samples
there; if Delta is nearly constant given (t, r) (high dimension), the weighted stationary point
equals the unweighted one, E[target | z_t].  Printed per (t, r): mean Delta and the coefficient
of variation (std / mean) of Delta and of w over n held-out samples with fresh noise
(EMA weights, labels as in the held-out set, no label dropout).
"""

import argparse

import torch

from zoo.config.schema import LossConfig
from zoo.data import build_data
from zoo.inference import load_model
from zoo.losses import MeanFlowLoss
from zoo.losses.base import Draws
from zoo.losses.time_sampling import TimePair

CELLS = [(1.0, 0.0), (1.0, 0.5), (0.5, 0.0), (0.9, 0.9), (0.5, 0.5), (0.2, 0.2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in args.checkpoints:
        loaded = load_model(path, torch.device("cpu"))
        cfg = loaded.cfg.loss
        loss = MeanFlowLoss(LossConfig(**{**cfg.model_dump(), "jvp": "nograd"}))
        source = build_data(loaded.cfg.data, "cpu", loaded.cfg.seed, batch_size=256)
        x, y = source.held_out_labeled(args.n)
        x = x.float()
        g = torch.Generator().manual_seed(0)
        print(f"{path}: data dim {x[0].numel()}, p={cfg.weight_p}, c={cfg.weight_c}")
        for t0, r0 in CELLS:
            n = x.shape[0]
            t, r = torch.full((n,), t0), torch.full((n,), r0)
            mask = t > r
            idx = torch.arange(n)
            times = TimePair(t=t, r=r, mask=mask, jvp_index=idx[mask], flow_index=idx[~mask])
            noise = torch.randn(x.shape, generator=g)
            draws = Draws(noise=noise, times=times, y=y, dropped=torch.zeros(n, dtype=torch.bool))
            with torch.enable_grad():
                terms = loss.terms_of(loaded.model, x, draws)
            delta, w = terms.delta.detach(), terms.weight
            cv = lambda a: (a.std() / a.mean()).item()  # noqa: E731
            print(
                f"  (t, r) = ({t0}, {r0}):  mean Delta {delta.mean().item():9.3f}   "
                f"CV(Delta) {cv(delta):.2f}   CV(w) {cv(w):.2f}"
            )


if __name__ == "__main__":
    main()
