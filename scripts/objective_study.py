"""Flow matching, MeanFlow, iMF and alpha-Flow on class-conditional Fashion-MNIST at equal wall-clock.

Works from nothing: for each objective it measures the seconds per training step of its preset on
this machine (alpha-Flow: both of its phases, weighted by its curriculum), sets train.steps so that
training takes `--budget-min` minutes, trains every (objective, seed) with `zoo train`'s code path,
then scores every sampler of each run at every guidance scale of `--guidances`:

    one-step objectives   1, 2 and 4 jumps (eval.meanflow_steps)
    flow matching         Euler at 8, 16 and 32 NFE

and reports, per objective and sampler, the best guidance scale (by the mean over seeds) with
the mean and standard error over seeds.  The decision the study serves: is the one-step sample of
an objective at or below flow matching's best multi-step sample at equal training time?

The networks are the fashion-mnist preset's U-Net (iMF adds its one-block v-head, as
fashion-mnist-imf does; `imf_wide_t` is the same iMF with cifar10-imf's logit-normal(-2, 2)
times).  Each run is scored as `zoo eval` scores it (zoo.checkpoint_eval): FD, KID, precision and
recall in the feature space of zoo's Fashion-MNIST classifier (trained and cached on first use,
minutes on a CPU), energy distance too; the best guidance scale is the one of lowest mean FD.

    .venv/bin/python scripts/objective_study.py --budget-min 15 --seeds 0,1,2   # ~4 h on 2 cores
    .venv/bin/python scripts/objective_study.py --budget-min 6 --jobs 2         # ~1.5 h: a run per core
    .venv/bin/python scripts/objective_study.py --budget-s 20 --seeds 0 --n 200 --guidances 1,2 \\
        model.channels=8 model.num_groups=4 --out outputs/study-tiny          # a minute: the plumbing

Writes `<out>/study.json` (every score, the calibration, the summary), `<out>/study.log`, the FD
against network calls per sample (`study.png`: classifier-free guidance at sampling costs two calls
per step, iMF's guidance input one) and the seed-0 samples by class (`samples.png`); `--plot
<out>/study.json` redraws both.
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tee import Tee  # scripts/tee.py, beside this script

from zoo.checkpoint_eval import prepare
from zoo.checkpoints import load_checkpoint
from zoo.config import load_config
from zoo.config.schema import ZooConfigBody
from zoo.evaluation import default_methods
from zoo.losses.alphaflow import alpha_at
from zoo.metrics.features import load_feature_net
from zoo.plotting import save_quality_vs_nfe
from zoo.training.trainer import build_state, train_run, train_step

# objective -> (preset, its overrides): one network size, class-conditional throughout.
OBJECTIVES: dict[str, tuple[str, list[str]]] = {
    "flow_matching": ("fashion-mnist", ["data.class_conditional=true", "loss.kind=flow_matching"]),
    "meanflow": ("fashion-mnist", ["data.class_conditional=true"]),
    "imf": ("fashion-mnist-imf", []),
    # iMF with the wide logit-normal(-2, 2) times of cifar10-imf: the paper's (-0.4, 1) rarely pairs
    # t near 1 with r near 0, the one jump that one-step sampling takes.
    "imf_wide_t": ("fashion-mnist-imf", ["loss.time_mu=-2", "loss.time_sigma=2"]),
    "alphaflow": ("fashion-mnist-alphaflow", []),
}
# Training's own end-of-run evaluation kept small: every run is scored afterwards by score_run.
TRAIN_EVAL = [
    "eval.features=off",
    "eval.n_samples=64",
    "eval.meanflow_steps=[1]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[8]",
]
# What each run is scored with: the one-step objectives at 1, 2 and 4 jumps, flow matching by its
# ODE at 8-32 NFE with Euler (Euler beat Heun at every NFE up to 16 on the main job).
ONE_STEP_SAMPLERS = {"meanflow_steps": [1, 2, 4], "solvers": []}
ODE_SAMPLERS = {"solvers": ["euler"], "solver_nfe": [8, 16, 32]}
PROBE_WARMUP = 2
PROBE_TRAINING_STEPS = 1000  # the nominal length of a calibration run (it places alpha-Flow's curriculum)


def study_config(objective: str, seed: int, common: list[str], steps: int = 1) -> ZooConfigBody:
    preset, extra = OBJECTIVES[objective]
    return load_config(
        preset,
        [*extra, *TRAIN_EVAL, *common, f"seed={seed}", f"train.steps={steps}"]
        + [f"run_name={objective}-s{seed}"],
    )


def seconds_per_step(cfg: ZooConfigBody, probe_steps: int, progress: float = 0.0) -> float:
    """Median seconds of `probe_steps` training steps after a warm-up, taken `progress` of the way
    through training (where alpha-Flow's curriculum is then)."""
    state = build_state(cfg, torch.device(cfg.device))
    state.step = int(progress * cfg.train.steps)
    times = []
    for k in range(PROBE_WARMUP + probe_steps):
        started = time.perf_counter()
        train_step(state)
        if k >= PROBE_WARMUP:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def calibrate(objective: str, common: list[str], probe_steps: int) -> dict:
    """Seconds per step of `objective` here; alpha-Flow's averages its no-JVP and JVP phases over
    the share of training each takes under its curriculum."""
    cfg = study_config(objective, 0, common, steps=PROBE_TRAINING_STEPS)
    if objective != "alphaflow":
        return {"s_per_step": seconds_per_step(cfg, probe_steps)}
    loss = cfg.loss
    grid = [k / 1000 for k in range(1000)]
    jvp_share = sum(alpha_at(loss, p) < loss.alpha_threshold for p in grid) / len(grid)
    blend = seconds_per_step(cfg, probe_steps, progress=(loss.alpha_start + loss.alpha_end) / 2)
    jvp = seconds_per_step(cfg, probe_steps, progress=loss.alpha_end)
    return {"s_per_step": (1 - jvp_share) * blend + jvp_share * jvp, "jvp_share": jvp_share}


METRICS = ("fd", "kid", "precision", "recall")  # FD decides; lower is better for FD and KID


def score_run(run_dir: Path, guidances: list[float], n: int, seed: int) -> list[dict]:
    """Every sampler of one run at every guidance scale, as `zoo eval` scores it: FD, KID,
    precision and recall in the feature space of zoo's Fashion-MNIST classifier (trained and
    cached on first use), and energy distance."""
    e = prepare(run_dir / "last.pt", torch.device("cpu"), n, guidances=guidances)
    samplers = ONE_STEP_SAMPLERS if e.loaded.is_meanflow else ODE_SAMPLERS
    e.eval_cfg = e.eval_cfg.model_copy(update={"features": "on", **samplers})
    e.methods = default_methods(e.eval_cfg, e.loaded.is_meanflow)
    e.shown = e.methods[0]
    e.load_features(lambda step, steps, loss: None)
    report = e.run(seed)
    if report.features is None:
        raise SystemExit(f"{run_dir}: no feature scores ({report.notes}); the study needs image data")
    return [
        {
            "method": r.method,
            "nfe": r.nfe,
            "guidance": r.guidance,
            **{m: r.scores[m].value for m in METRICS},
            **{f"{m}_se": r.scores[m].stderr for m in METRICS},
            "energy_distance": r.energy_distance,
        }
        for r in report.rows
    ]


def training_seconds(run_dir: Path) -> float:
    """The training loop's own clock at the run's last logged step (time/elapsed_s)."""
    seconds = 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        seconds = json.loads(line).get("time/elapsed_s", seconds)
    return seconds


def train_and_score(
    cfg: ZooConfigBody, guidances: list[float], n: int, seed: int, threads: int
) -> tuple[int, float, list[dict]]:
    """One (objective, seed): trained with `zoo train`'s code path, then scored; runs in a worker
    process of its own. A run already trained to its steps in the output folder is only scored,
    one stopped part-way is resumed. Returns (steps, training seconds, score rows)."""
    torch.set_num_threads(threads)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    last = run_dir / "last.pt"
    done = last.exists() and load_checkpoint(last)["step"] == cfg.train.steps
    if not done:
        train_run(cfg, resume=last.exists(), restart=run_dir.exists() and not last.exists())
    return cfg.train.steps, training_seconds(run_dir), score_run(run_dir, guidances, n, seed)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and its standard error (nan with one seed)."""
    stderr = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return statistics.mean(values), stderr


def network_calls(objective: str, nfe: int, guidance: float) -> int:
    """Network evaluations per sample: classifier-free guidance applied at sampling (flow matching,
    MeanFlow, alpha-Flow) evaluates the conditional and the unconditional prediction at every step;
    iMF takes the guidance scale as an input and needs one call per step."""
    return nfe if guidance == 1 or objective.startswith("imf") else 2 * nfe


def summarise(scores: list[dict]) -> list[dict]:
    """Per objective and sampler: the guidance scale with the lowest mean FD over seeds, and at
    that scale every metric's mean and standard error over seeds."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for s in scores:
        groups.setdefault((s["objective"], s["method"], s["nfe"]), {}).setdefault(s["guidance"], []).append(s)
    rows = []
    for (objective, method, nfe), by_guidance in groups.items():
        best = min(by_guidance, key=lambda g: statistics.mean(s["fd"] for s in by_guidance[g]))
        runs = by_guidance[best]
        row = {
            "objective": objective,
            "method": method,
            "nfe": nfe,
            "calls": network_calls(objective, nfe, best),
            "guidance": best,
            "seeds": len(runs),
        }
        for metric in (*METRICS, "energy_distance"):
            row[metric], row[f"{metric}_se"] = mean_and_stderr([s[metric] for s in runs])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["objective"], r["nfe"], r["method"]))


def verdict(rows: list[dict]) -> list[str]:
    """Each one-step objective's 1-NFE FD against flow matching's best multi-step FD: the gap with
    its standard error over seeds (nan with one seed), so a difference within noise reads so."""
    fm = [r for r in rows if r["objective"] == "flow_matching"]
    if not fm:
        return []
    best = min(fm, key=lambda r: r["fd"])
    fd = f"{best['fd']:.3f} ± {best['fd_se']:.3f}"
    lines = [f"flow matching's best FD: {best['method']} ({best['nfe']} NFE) {fd}"]
    for r in rows:
        if r["nfe"] == 1 and r["objective"] != "flow_matching":
            gap, stderr = r["fd"] - best["fd"], (r["fd_se"] ** 2 + best["fd_se"] ** 2) ** 0.5
            lines.append(
                f"{r['objective']} 1-NFE FD {r['fd']:.3f} ± {r['fd_se']:.3f} (guidance {r['guidance']:g}): "
                f"minus flow matching's best = {gap:+.3f} ± {stderr:.3f}"
            )
    return lines


def plot_summary(rows: list[dict], path: Path, budget_s: float) -> None:
    """FD against network calls per sample, one line per objective (each sampler at its best
    guidance scale, mean ± s.e. over seeds)."""
    curves = []
    for objective in dict.fromkeys(r["objective"] for r in rows):
        mine = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["nfe"])
        sampler = mine[0]["method"].split()[0]
        label = f"{objective} ({'average-velocity jumps' if sampler == 'MeanFlow' else sampler})"
        calls = [r.get("calls", r["nfe"]) for r in mine]
        curves.append((label, calls, [r["fd"] for r in mine], [r["fd_se"] for r in mine]))
    title = f"class-conditional Fashion-MNIST, {budget_s / 60:g} min of training each"
    save_quality_vs_nfe(curves, path, "FD (zoo's Fashion-MNIST features)", title=title)


def draw_samples(out: Path, summary: list[dict], path: Path, seed: int = 0, per_class: int = 8) -> None:
    """One panel per objective of its seed-`seed` run: `per_class` samples of each class (a row per
    class) from the same noise, by its 1-step jumps (flow matching: Euler at 16 NFE) at the
    guidance scale the study found best for that sampler."""
    from matplotlib.figure import Figure

    from zoo.inference import load_model, resolve_run_guidance
    from zoo.plotting import image_grid
    from zoo.solvers.samplers import sample_meanflow, sample_ode

    panels = []
    for objective in [o for o in OBJECTIVES if any(r["objective"] == o for r in summary)]:
        loaded = load_model(out / f"{objective}-s{seed}" / "last.pt", torch.device("cpu"))
        nfe = 1 if loaded.is_meanflow else 16
        row = next(r for r in summary if r["objective"] == objective and r["nfe"] == nfe)
        guidance = resolve_run_guidance(loaded, row["guidance"], None)
        classes = loaded.model.num_classes
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((classes * per_class, *loaded.payload["data_shape"]), generator=generator)
        y = torch.arange(classes).repeat_interleave(per_class)
        with torch.no_grad():
            if loaded.is_meanflow:
                x = sample_meanflow(loaded.model, noise, 1, y, guidance)
            else:
                x = sample_ode(loaded.model, noise, "euler", nfe, y, guidance)
        title = f"{objective}\n{nfe} step{'s' if nfe > 1 else ''}, ω {row['guidance']:g}, FD {row['fd']:.0f}"
        panels.append((title, image_grid(x, nrow=per_class)))
    figure = Figure(figsize=(2.6 * len(panels), 3.6), dpi=100)
    for k, (title, grid) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), k + 1)
        axes.imshow(grid, interpolation="nearest")
        axes.set_title(title, fontsize="small")
        axes.axis("off")
    figure.savefig(path, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-min", type=float, default=15.0, help="training minutes per run")
    budget.add_argument("--budget-s", type=float, default=None, help="training seconds per run (tiny runs)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--guidances", default="1,1.5,2,3,4", help="guidance scales each run is scored at")
    parser.add_argument("--n", type=int, default=1000, help="samples per score")
    parser.add_argument("--probe-steps", type=int, default=5, help="timed steps per calibration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--rounds", type=int, default=3, help="calibration rounds over the objectives")
    parser.add_argument(
        "--steps",
        default=None,
        help="train.steps per objective instead of calibrating, e.g. flow_matching=2033,meanflow=1510 "
        "(to finish a study in its --out folder: finished runs are only scored, stopped ones resumed)",
    )
    parser.add_argument(
        "--ode-guidances", default=None, help="guidance scales for flow matching's ODE (default: --guidances)"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="only redraw the figures of this study.json")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    if args.plot is not None:
        done = json.loads(args.plot.read_text())
        for row in done["summary"]:
            row["calls"] = network_calls(row["objective"], row["nfe"], row["guidance"])
        plot_summary(done["summary"], args.plot.with_suffix(".png"), done["budget_s"])
        first, seed = done["summary"][0]["objective"], done["seeds"][0]
        if args.plot.with_name(f"{first}-s{seed}").is_dir():  # the runs are still beside study.json
            draw_samples(args.plot.parent, done["summary"], args.plot.with_name("samples.png"), seed)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    objectives = args.objectives.split(",")
    if unknown := [o for o in objectives if o not in OBJECTIVES]:
        parser.error(f"unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")
    guidances = [float(g) for g in args.guidances.split(",")]
    ode_guidances = [float(g) for g in args.ode_guidances.split(",")] if args.ode_guidances else guidances
    budget_s = args.budget_s if args.budget_s is not None else 60 * args.budget_min
    out = args.out or Path("outputs") / f"objective-study-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    log = Tee(out / "study.log")
    log("command:", " ".join([sys.executable, *sys.argv]))
    log(f"config: budget {budget_s:g} s per run, seeds {seeds}, objectives {objectives}")
    log(f"        guidances {guidances}, flow matching's ODE {ode_guidances}")
    log(f"        n={args.n}, threads={args.threads}, jobs={args.jobs}, overrides={args.overrides}")
    common = [
        f"output_dir={out}",
        "experiment_log=",
        "device=cpu",
        "tracking.enabled=false",
        f"threads={args.threads}",
        *args.overrides,
    ]
    started = time.time()
    # Rounds over the objectives, each objective's median kept: a change of the machine's load
    # during calibration then weighs on every objective alike.
    probes: dict[str, list[dict]] = {objective: [] for objective in objectives}
    for _ in range(args.rounds if args.steps is None else 0):
        for objective in objectives:
            probes[objective].append(calibrate(objective, common, args.probe_steps))
    calibration = {}
    if args.steps is not None:
        given = dict(item.split("=") for item in args.steps.split(","))
        if missing := [o for o in objectives if o not in given]:
            parser.error(f"--steps names no steps for {missing}")
        calibration = {o: {"steps": int(given[o]), "given": True} for o in objectives}
        log(f"steps given: {calibration}")
    for objective in objectives if args.steps is None else []:
        s_per_step = statistics.median(p["s_per_step"] for p in probes[objective])
        calibration[objective] = {**probes[objective][0], "s_per_step": s_per_step}
        calibration[objective]["rounds"] = [p["s_per_step"] for p in probes[objective]]
        calibration[objective]["steps"] = max(1, int(budget_s / s_per_step))
        log(f"calibrated {objective:14s} {calibration[objective]}")
    # The feature network, trained once here (cached), before parallel runs would each train it.
    load_feature_net(study_config(objectives[0], 0, common).data)
    # Flow matching's runs first: their ODE samplers take longest to score.
    jobs = sorted(
        (
            (objective, seed, study_config(objective, seed, common, calibration[objective]["steps"]))
            for seed in seeds
            for objective in objectives
        ),
        key=lambda job: (job[0] != "flow_matching", job[1]),
    )
    scores, trained = [], {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(
                train_and_score,
                cfg,
                ode_guidances if objective == "flow_matching" else guidances,
                args.n,
                seed,
                args.threads,
            ): (objective, seed)
            for objective, seed, cfg in jobs
        }
        for future in as_completed(futures):
            objective, seed = futures[future]
            name = f"{objective}-s{seed}"
            steps, trained[name], rows = future.result()
            log(f"trained {name}: {steps} steps in {trained[name]:.0f} s")
            for row in rows:
                scores.append({"objective": objective, "seed": seed, **row})
                log(
                    f"  {name} guidance {row['guidance']:g} {row['method']:18s} NFE {row['nfe']:3d} "
                    f"FD {row['fd']:.3f} ± {row['fd_se']:.3f}  KID {row['kid']:.4f}  "
                    f"precision {row['precision']:.3f}  recall {row['recall']:.3f}"
                )
    summary = summarise(scores)
    log("summary (the guidance of lowest mean FD per sampler; mean ± s.e. over seeds):")
    for r in summary:
        log(
            f"  {r['objective']:14s} {r['method']:18s} NFE {r['nfe']:3d} ({r['calls']:3d} calls) "
            f"guidance {r['guidance']:<4g} "
            f"FD {r['fd']:.3f} ± {r['fd_se']:.3f}  KID {r['kid']:.4f} ± {r['kid_se']:.4f}  "
            f"precision {r['precision']:.3f} ± {r['precision_se']:.3f}  "
            f"recall {r['recall']:.3f} ± {r['recall_se']:.3f} (n={r['seeds']})"
        )
    for line in verdict(summary):
        log(line)
    result = {
        "budget_s": budget_s,
        "seeds": seeds,
        "guidances": guidances,
        "ode_guidances": ode_guidances,
        "n": args.n,
        "metric": "FD in the feature space of zoo's Fashion-MNIST classifier (also KID, precision, recall)",
        "calibration": calibration,
        "train_seconds": trained,
        "scores": scores,
        "summary": summary,
        "seconds": time.time() - started,
    }
    (out / "study.json").write_text(json.dumps(result, indent=2))
    plot_summary(summary, out / "study.png", budget_s)
    draw_samples(out, summary, out / "samples.png", seeds[0])
    log(f"wrote {out / 'study.json'} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
