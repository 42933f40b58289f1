"""`zoo eval CKPT`: energy distance to held-out data for every sampler (and, with --fid, FID for
one), as a table, a JSON file and a picture of samples."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from zoo.output_paths import check_writable_file
from zoo.runs import atomic_write_json
from zoo_cli.errors import fail, user_errors
from zoo_cli.render import eval_table, make_console
from zoo_cli.sample import parse_interval, sampling_guidance

console = make_console()

FID_STANDARD_N = 50_000  # --fid-n's default: the number of images FID is usually reported over


def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint (outputs/RUN/last.pt or step_XXXXXXX.pt)")],
    n: Annotated[
        int | None, typer.Option("--n", min=16, help="samples per metric (default: the run's eval.n_samples)")
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="where to write the results (default: beside the checkpoint); "
            "a PNG of samples goes beside it",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="noise seed: two seeds give two independent evaluations")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    data_root: Annotated[
        str | None, typer.Option("--data-dir", help="dataset folder, if not the run's data.root")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=0, help="CPU threads (0 = torch default; 1 on a shared machine)")
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="guidance scale (default: the run's eval.guidance): classifier-free, or the model's input "
            "for models trained with guidance as a condition (iMF)",
        ),
    ] = None,
    guidance_interval: Annotated[
        str | None,
        typer.Option(
            "--guidance-interval",
            help="times a,b guidance acts on, for models trained with guidance as a condition (iMF)",
        ),
    ] = None,
    fid: Annotated[
        bool,
        typer.Option(
            "--fid", help="also FID against clean-fid's reference statistics (CIFAR-10 only; needs clean-fid)"
        ),
    ] = False,
    fid_n: Annotated[
        int | None,
        typer.Option(
            "--fid-n", min=2, help=f"generated images for FID (default: {FID_STANDARD_N}, the standard)"
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
            help="network evaluations per FID image (default: 1 for MeanFlow, "
            "else the run's largest eval.solver_nfe)",
        ),
    ] = None,
    fid_batch_size: Annotated[
        int | None,
        typer.Option(
            "--fid-batch-size",
            min=1,
            help="images generated and scored at once for FID (default: eval.batch_size)",
        ),
    ] = None,
) -> None:
    """Evaluate a checkpoint: MeanFlow 1/2/4 steps and ODE solvers at several NFE (+ FID with --fid)."""
    import torch

    from zoo.data import build_data
    from zoo.devices import resolve_device
    from zoo.evaluation import default_methods, evaluate, evaluate_fid, headline_method
    from zoo.inference import load_model
    from zoo.metrics.fid import fid_reference, load_fid_backend
    from zoo.solvers.samplers import sampler_guidance

    # None defaults tell an option given from one left out, even when given its default value.
    fid_options = {
        "--fid-n": fid_n,
        "--fid-solver": fid_solver,
        "--fid-nfe": fid_nfe,
        "--fid-batch-size": fid_batch_size,
    }
    given = [flag for flag, value in fid_options.items() if value is not None]
    if given and not fid:
        raise fail(f"{', '.join(given)} given without --fid (the FID options only apply with it); add --fid")
    fid_n = fid_n if fid_n is not None else FID_STANDARD_N
    json_out = json_out or checkpoint.with_name(f"eval_{checkpoint.stem}_seed{seed}.json")
    picture = json_out.with_suffix(".png")
    interval = parse_interval(guidance_interval)
    with user_errors():
        # Every output and every FID prerequisite is checked before any sampling.
        check_writable_file(json_out, "--json")
        check_writable_file(picture, "--json (its .png)")
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        loaded = load_model(checkpoint, dev)
        cfg = loaded.cfg
        eval_cfg = cfg.eval.model_copy(update={"n_samples": n}) if n else cfg.eval
        chosen = sampling_guidance(loaded, guidance, interval)
        eval_cfg = eval_cfg.model_copy(
            update={"guidance": chosen.scale, "guidance_interval": chosen.interval}
        )
        try:
            shown = headline_method(eval_cfg, loaded.is_meanflow, fid_solver, fid_nfe)
        except ValueError as exc:
            raise fail(f"--fid-solver/--fid-nfe: {exc}") from None
        backend = load_fid_backend(fid_reference(cfg.data.name), dev) if fid else None
        data_cfg = cfg.data.model_copy(update={"root": data_root}) if data_root else cfg.data
        source = build_data(data_cfg, dev, cfg.seed, batch_size=eval_cfg.batch_size)
        methods = default_methods(eval_cfg, loaded.is_meanflow)
        if shown not in methods:
            methods.append(shown)  # the FID / picture sampler also gets its energy-distance row
        with Progress(console=Console(stderr=True), transient=True) as progress:
            report = evaluate(
                loaded.model,
                source,
                eval_cfg,
                meanflow=loaded.is_meanflow,
                seed=seed,
                methods=methods,
                progress=progress,
            )
            if backend is not None:
                batches = -(-fid_n // (fid_batch_size or eval_cfg.batch_size))
                task = progress.add_task(f"FID: {fid_n} images, {shown.label}", total=batches)
                info = evaluate_fid(
                    loaded.model,
                    shown,
                    backend,
                    fid_n,
                    fid_batch_size or eval_cfg.batch_size,
                    sampler_guidance(eval_cfg),
                    seed=seed,
                    on_batch=lambda: progress.advance(task),
                )
                report.record_fid(shown, info)
        title = f"{shown.label}, step {loaded.step}"
        save_samples_picture(loaded.model, shown, eval_cfg, source, picture, seed, title)
        atomic_write_json(
            json_out, {"checkpoint": str(checkpoint), "step": loaded.step, "seed": seed, **report.to_dict()}
        )
    console.print(eval_table(report, title=f"{checkpoint} (step {loaded.step}, EMA weights)"))
    if report.fid is not None:
        console.print(
            f"FID {report.fid.value:.3f} ({report.fid.method}, {report.fid.n_samples} images vs "
            f"{report.fid.reference}, clean-fid)"
        )
    console.print(f"wrote {json_out} and {picture}")


def save_samples_picture(model, method, eval_cfg, source, path: Path, seed: int, title: str) -> None:
    """Samples of `method` from the evaluation's noise, a look next to the numbers: a grid of
    eval.grid_size images, or for 2-D data eval.n_samples points over held-out points."""
    from zoo.evaluation import draw_noise_and_labels, generate
    from zoo.plotting import save_image_grid, save_scatter
    from zoo.solvers.samplers import sampler_guidance

    device = next(model.parameters()).device
    count = eval_cfg.n_samples if len(model.data_shape) == 1 else eval_cfg.grid_size
    noise, labels = draw_noise_and_labels(model, count, device, seed)
    samples = generate(model, method, noise, labels, sampler_guidance(eval_cfg), eval_cfg.batch_size)
    if len(model.data_shape) == 1:
        save_scatter(samples, path, reference=source.held_out(eval_cfg.n_samples).float().cpu(), title=title)
    else:
        save_image_grid(samples, path)
