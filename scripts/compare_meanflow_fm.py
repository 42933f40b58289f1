"""MeanFlow at 1 NFE against flow matching at 50+ NFE, trained for the same steps on a 2-D preset.

Works from nothing: trains both runs (the same `zoo train` code path), evaluates each with the
same held-out data and noise, and writes `<out>/compare.json`, `<out>/compare.log` and a bar
plot with error bars and the data-vs-data floor.

    .venv/bin/python scripts/compare_meanflow_fm.py --preset moons --steps 3000
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tee import Tee  # scripts/tee.py, beside this script

from zoo.config import load_config
from zoo.data import build_data
from zoo.evaluation import Method, evaluate
from zoo.inference import load_model
from zoo.plotting import save_metric_bars
from zoo.training.trainer import train_run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="moons")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--n", type=int, default=4000, help="samples per energy distance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("outputs") / f"compare-{args.preset}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    log = Tee(out / "compare.log")
    log("command:", " ".join([sys.executable, *sys.argv]))
    log(
        f"config: preset={args.preset} steps={args.steps} n={args.n} seed={args.seed} "
        f"overrides={args.overrides}"
    )

    common = [
        f"train.steps={args.steps}",
        f"seed={args.seed}",
        f"output_dir={out}",
        "experiment_log=",
        "device=cpu",
        "tracking.enabled=false",
        *args.overrides,
    ]
    runs = {}
    for kind in ("meanflow", "flow_matching"):
        cfg = load_config(args.preset, [*common, f"loss.kind={kind}", f"run_name={kind}"])
        started = time.time()
        runs[kind] = train_run(cfg)
        log(f"trained {kind}: {time.time() - started:.0f} s")

    methods = {
        "meanflow": [Method("meanflow", 1, 1), Method("meanflow", 2, 2)],
        "flow_matching": [
            Method("euler", 50, 50),
            Method("heun", 25, 50),
            Method("euler", 100, 100),
            Method("rk4", 25, 100),
        ],
    }
    rows, floor = [], None
    for kind, run in runs.items():
        loaded = load_model(run.last, torch.device("cpu"))
        source = build_data(loaded.cfg.data, "cpu", loaded.cfg.seed, batch_size=256)
        eval_cfg = loaded.cfg.eval.model_copy(update={"n_samples": args.n})
        report = evaluate(
            loaded.model, source, eval_cfg, meanflow=kind == "meanflow", seed=args.seed, methods=methods[kind]
        )
        floor = report.noise_floor
        for row in report.rows:
            rows.append({"training": kind, **row.__dict__})
            log(
                f"{kind:14s} {row.method:18s} NFE {row.nfe:3d}  "
                f"energy distance {row.energy_distance:.5f} ± {row.stderr:.5f}"
            )
    log(
        f"{'data vs data':14s} {'floor':18s}          "
        f"energy distance {floor.energy_distance:.5f} ± {floor.stderr:.5f}"
    )

    result = {
        "preset": args.preset,
        "steps": args.steps,
        "n": args.n,
        "seed": args.seed,
        "rows": rows,
        "floor": floor.__dict__,
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    save_metric_bars(
        [f"{r['training']}\n{r['method']}" for r in rows],
        [r["energy_distance"] for r in rows],
        [r["stderr"] for r in rows],
        out / "compare.png",
        ylabel="energy distance to held-out data",
        title=f"{args.preset}: MeanFlow 1-NFE vs flow matching, {args.steps} steps each",
        floor=floor.energy_distance,
    )
    log(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")


if __name__ == "__main__":
    main()
