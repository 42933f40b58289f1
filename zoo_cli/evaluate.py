"""`zoo eval CKPT [CKPT ...]`: every sampler's quality (feature-space FD, KID, precision and recall
for images, energy distance for all data; with --fid, FID for one sampler) beside the
data-vs-data floor, as a table, a JSON file, a picture of samples and a quality-vs-NFE plot.

Several checkpoints go into one command rather than a separate `zoo compare`: they are evaluated
exactly as one is (same options, same seed, so the same noise), and comparing objectives is then
the one command a user already knows, with one joint table and plot on top."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from zoo.config.schema import MAX_BATCH, MAX_EVAL_SAMPLES, MAX_GUIDANCE, MAX_NFE, MAX_SEED, MAX_THREADS
from zoo.output_paths import check_writable_file
from zoo.runs import atomic_write_json
from zoo_cli.errors import fail, user_errors
from zoo_cli.options import DeviceOption
from zoo_cli.render import eval_table, make_console
from zoo_cli.sample import parse_interval, resolve_checkpoint_path

console = make_console()

FID_STANDARD_N = 50_000  # --fid-n's default: the number of images FID is usually reported over
# FID streams its samples, so only time bounds it: twenty times the standard number.
MAX_FID_SAMPLES = 1_000_000


def eval_command(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="checkpoints (outputs/RUN/last.pt, step_XXXXXXX.pt) or run folders; several are "
            "evaluated alike (same seed, same n) and compared in one table and one plot",
            show_default=False,
        ),
    ],
    n: Annotated[
        int | None,
        typer.Option(
            "--n",
            min=16,
            max=MAX_EVAL_SAMPLES,
            help="samples per metric (default: the run's eval.n_samples; the metric's cost grows with n²)",
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="where to write the results (default: beside the checkpoint; with several checkpoints, "
            "the joint table, default beside their run folders); PNGs of samples and of quality vs "
            "NFE go beside it",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="noise seed: two seeds give two independent evaluations")
    ] = 0,
    guidance: Annotated[
        list[float] | None,
        typer.Option(
            min=0.0,
            max=MAX_GUIDANCE,
            help="guidance scale of class-conditional models (classifier-free, or the model's input for "
            "models trained with guidance as a condition, iMF); repeat for one row per scale: the table "
            "and JSON name the best (default: the run's eval.guidance)",
        ),
    ] = None,
    guidance_interval: Annotated[
        str | None,
        typer.Option(
            "--guidance-interval",
            help="times a,b (0 <= a <= b <= 1) guidance acts on, for every --guidance, for models trained "
            "with guidance as a condition (iMF); default: the run's eval.guidance_interval, else 0,1",
        ),
    ] = None,
    device: DeviceOption = "auto",
    data_root: Annotated[
        str | None, typer.Option("--data-dir", help="dataset folder, if not the run's data.root")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_THREADS, help="CPU threads (0 = torch default; 1 on a shared machine)"),
    ] = None,
    fid: Annotated[
        bool,
        typer.Option(
            "--fid",
            help="also FID of the picture's sampler: against clean-fid's statistics (CIFAR-10), or --fid-ref",
        ),
    ] = False,
    fid_n: Annotated[
        int | None,
        typer.Option(
            "--fid-n",
            min=2,
            max=MAX_FID_SAMPLES,
            help=f"generated images for FID (default: {FID_STANDARD_N}, the standard)",
        ),
    ] = None,
    fid_solver: Annotated[
        str | None,
        typer.Option(
            "--fid-solver",
            help="sampler for FID: meanflow | euler | midpoint | heun | rk4 (default: MeanFlow jumps "
            "for a MeanFlow model, else the run's first eval solver)",
        ),
    ] = None,
    fid_nfe: Annotated[
        int | None,
        typer.Option(
            "--fid-nfe",
            min=1,
            max=MAX_NFE,
            help="network evaluations per FID image (default: 1 for MeanFlow, "
            "else the run's largest eval.solver_nfe)",
        ),
    ] = None,
    fid_batch_size: Annotated[
        int | None,
        typer.Option(
            "--fid-batch-size",
            min=1,
            max=MAX_BATCH,
            help="images generated and scored at once for FID (default: eval.batch_size)",
        ),
    ] = None,
    fid_ref: Annotated[
        Path | None,
        typer.Option(
            "--fid-ref",
            help="FID against these Inception statistics instead of clean-fid's (needed for latent models, "
            "whose samples are decoded): ADM's VIRTUAL_imagenet256_labeled.npz, an .npz zoo wrote, or an "
            "image folder (statistics computed once and cached)",
        ),
    ] = None,
) -> None:
    """Evaluate checkpoints: MeanFlow 1/2/4 steps and ODE solvers at several NFE (+ FID with --fid)."""
    import torch

    from zoo.checkpoint_eval import EvalOutputs, check_comparable, comparison_json, fid_scorer, prepare
    from zoo.devices import resolve_device
    from zoo.evaluation import save_quality_plot, wants_features
    from zoo.training.progress import step_bar

    # None defaults tell an option given from one left out, even when given its default value.
    fid_options = {
        "--fid-n": fid_n,
        "--fid-solver": fid_solver,
        "--fid-nfe": fid_nfe,
        "--fid-batch-size": fid_batch_size,
        "--fid-ref": fid_ref,
    }
    given = [flag for flag, value in fid_options.items() if value is not None]
    if given and not fid:
        raise fail(f"{', '.join(given)} given without --fid (the FID options only apply with it); add --fid")
    fid_n = fid_n if fid_n is not None else FID_STANDARD_N
    interval = parse_interval(guidance_interval)
    checkpoints = [resolve_checkpoint_path(c) for c in checkpoints]
    several = len(checkpoints) > 1
    outputs = [
        EvalOutputs(json_out) if json_out and not several else EvalOutputs.beside(c, seed)
        for c in checkpoints
    ]
    with user_errors():
        # Every output and every prerequisite (data, feature network, FID statistics) is checked
        # before any sampling.
        for out in outputs:
            check_outputs(out)
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        evals = [prepare(c, dev, n, data_root, guidance, fid_solver, fid_nfe, interval) for c in checkpoints]
        joint = None
        if several:
            check_comparable(evals)
            joint = EvalOutputs(comparison_json(evals, seed, json_out))
            check_outputs(joint, samples=False)
        scorers = [fid_scorer(e, fid_ref) if fid else None for e in evals]
        for e in evals:
            if wants_features(e.eval_cfg, e.source):
                with step_bar(make_console(stderr=True), f"feature network for {e.source.name}") as on_step:
                    e.load_features(on_step)
        reports = []
        with Progress(console=Console(stderr=True), transient=True) as progress:
            for e, scorer in zip(evals, scorers, strict=True):
                report = e.run(seed, progress)
                if scorer is not None:
                    info = scorer.score(e, fid_n, fid_batch_size or e.eval_cfg.batch_size, seed, progress)
                    report.record_fid(e.shown, info, e.eval_cfg.guidance)
                reports.append(report)
        for e, report, out in zip(evals, reports, outputs, strict=True):
            write_evaluation(e, report, out, seed)
        if joint is not None:
            named = [(e.name, r) for e, r in zip(evals, reports, strict=True)]
            save_quality_plot(named, joint.quality, title=f"{evals[0].source.name}, seed {seed}")
            runs = [
                {"name": e.name, "checkpoint": str(e.checkpoint), "step": e.loaded.step, **r.to_dict()}
                for e, r in zip(evals, reports, strict=True)
            ]
            atomic_write_json(joint.json, {"seed": seed, "runs": runs})
    named = [(e.name, r) for e, r in zip(evals, reports, strict=True)]
    title = (
        f"{evals[0].checkpoint} (step {evals[0].loaded.step}, EMA weights, seed {seed})"
        if not several
        else f"{len(evals)} checkpoints, EMA weights, seed {seed}"
    )
    console.print(eval_table(named, title=title))
    for e, report in zip(evals, reports, strict=True):
        info = report.fid
        if info is not None:
            console.print(
                f"{e.name}: FID {info.value:.3f} ({info.method}, {info.n_samples} images vs {info.reference})"
            )
        if report.features is not None:
            console.print(f"features: {report.features}")
        for note in report.notes:
            console.print(f"{e.name}: {note}")
    for out in outputs:
        console.print(f"wrote {out.json}, {out.samples} and {out.quality}")
    if joint is not None:
        console.print(f"wrote {joint.json} and {joint.quality}")


def check_outputs(out, samples: bool = True) -> None:
    check_writable_file(out.json, "--json")
    if samples:
        check_writable_file(out.samples, "--json (its .png)")
    check_writable_file(out.quality, "--json (its _quality.png)")


def write_evaluation(e, report, out, seed: int) -> None:
    """One checkpoint's JSON, picture of samples and quality-vs-NFE plot."""
    from zoo.evaluation import save_quality_plot
    from zoo.training.visuals import save_samples

    title = f"{e.shown.label}, step {e.loaded.step}"
    save_samples(e.loaded.model, e.source, e.shown, out.samples, e.eval_cfg, seed, title=title)
    save_quality_plot([(e.name, report)], out.quality, title=f"{e.name}, step {e.loaded.step}, seed {seed}")
    payload = {"checkpoint": str(e.checkpoint), "step": e.loaded.step, "seed": seed, **report.to_dict()}
    atomic_write_json(out.json, payload)
