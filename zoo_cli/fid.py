"""`zoo fid CKPT --ref PATH`: FID and Inception Score of a checkpoint's samples, as papers report them.

--ref is ADM's reference batch (VIRTUAL_imagenet256_labeled.npz, the ImageNet-256 standard), an
.npz of statistics zoo wrote, or an image folder (class folders or flat) whose statistics are
computed once and cached.  Everything the command needs (the reference, clean-fid's Inception
weights, a latent model's VAE) is checked before the first sample is drawn.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from zoo.config.schema import MAX_BATCH, MAX_GUIDANCE, MAX_NFE, MAX_SEED
from zoo.output_paths import check_writable_file, no_cache_notice
from zoo_cli.errors import err_console, fail, user_errors
from zoo_cli.evaluate import MAX_FID_SAMPLES
from zoo_cli.options import DeviceOption, ThreadsOption
from zoo_cli.render import make_console
from zoo_cli.sample import check_method_args, choose_method, resolve_checkpoint_path

console = make_console()


def fid_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="a checkpoint (outputs/RUN/last.pt, step_XXXXXXX.pt) or a run folder")
    ],
    ref: Annotated[
        Path,
        typer.Option(
            help="reference: ADM's VIRTUAL_imagenet256_labeled.npz, a statistics .npz zoo wrote, or an image "
            "folder (e.g. data/imagenet/train; statistics computed once and cached)"
        ),
    ],
    n: Annotated[
        int, typer.Option("--n", min=2, max=MAX_FID_SAMPLES, help="samples scored (papers: 50000)")
    ] = 50_000,
    nfe: Annotated[
        int | None, typer.Option(min=1, max=MAX_NFE, help="network evaluations (as in zoo sample)")
    ] = None,
    solver: Annotated[str | None, typer.Option(help="euler|midpoint|heun|rk4 (as in zoo sample)")] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=MAX_GUIDANCE,
            help="guidance scale (default: the run's eval.guidance): classifier-free, or the model's input "
            "for models trained with guidance as a condition (iMF; on the run's eval.guidance_interval)",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="samples generated and scored at a time")
    ] = 250,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="seed of the noise and the class order")] = 0,
    resize: Annotated[
        str | None,
        typer.Option(
            help="how images reach Inception: tf (resized inside the network, as TF's graph; ADM's "
            "statistics) or clean (clean-fid's PIL bicubic); default: the reference's (clean for a folder)"
        ),
    ] = None,
    stats_cache: Annotated[
        Path | None,
        typer.Option(help="where a folder's statistics are cached (default $ZOO_CACHE_DIR/fid-stats)"),
    ] = None,
    ref_limit: Annotated[
        int | None,
        typer.Option(
            min=2, max=10**9, help="a folder reference: an evenly spread subset of this many images"
        ),
    ] = None,
    num_workers: Annotated[int, typer.Option(min=0, max=64, help="processes reading a folder reference")] = 4,
    vae: Annotated[
        str | None, typer.Option(help="latent models: the VAE to decode with (as in zoo sample)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="JSON to write (default RUN/fid/<ckpt>_<sampler>.json)")
    ] = None,
    device: DeviceOption = "auto",
    raw: Annotated[bool, typer.Option("--raw", help="use the raw weights instead of the EMA")] = False,
    threads: ThreadsOption = 0,
) -> None:
    """FID and Inception Score of a checkpoint's samples against a reference."""
    checkpoint = resolve_checkpoint_path(checkpoint)
    with user_errors():
        if resize not in (None, "clean", "tf"):
            raise fail(f"--resize must be clean or tf, got {resize!r}")
        if solver not in (None, "meanflow"):
            check_method_args(nfe, solver)
        if out is not None:
            check_writable_file(out, "--out")

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from zoo.data.latents import is_latent_data, latent_vae_name, load_decoder
    from zoo.devices import resolve_device
    from zoo.inference import load_model, resolve_run_guidance
    from zoo.metrics.inception import InceptionV3, default_stats_cache
    from zoo.models.vae import decode_latents
    from zoo.runs import atomic_write_json
    from zoo.scoring import open_reference, reference_statistics, score_model

    with user_errors():
        cache = stats_cache or default_stats_cache()
        reference = open_reference(ref, resize, cache)
        if reference is None and cache is None:
            err_console.print(f"[yellow]{escape(no_cache_notice())}[/]", highlight=False)
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        extractor = InceptionV3(dev, reference.resize if reference else resize or "clean")
        loaded = load_model(checkpoint, dev, use_ema=not raw)
        model = loaded.model
        # The run's eval.guidance_interval too, for models conditioned on guidance (iMF).
        guidance = resolve_run_guidance(loaded, guidance, None)
        method = choose_method(loaded.cfg.eval, loaded.is_meanflow, nfe, solver)
        decoder = None
        if is_latent_data(loaded.cfg.data):
            decoder = load_decoder(*latent_vae_name(loaded.cfg.data, vae), dev)
        elif vae is not None:
            raise fail("--vae given, but this model generates pixels, not latents")
        if len(model.data_shape) != 3:
            raise fail("FID scores images; this model generates 2-D points (use zoo eval's energy distance)")
        out = (
            out
            or checkpoint.parent
            / "fid"
            / f"{checkpoint.stem}_{method.kind}_{method.nfe}nfe_g{guidance.scale:g}.json"
        )
        check_writable_file(out, "--out")

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=make_console(stderr=True),
        ) as progress:
            side = model.data_shape[-1] * (decoder.downsample_factor if decoder is not None else 1)
            reference = reference_statistics(
                ref,
                reference,
                extractor,
                side,
                cache,
                progress,
                batch_size=batch_size,
                num_workers=num_workers,
                limit=ref_limit,
            )
            task = progress.add_task(f"{method.label}, {n} samples", total=n)
            scores = score_model(
                model,
                method,
                guidance,
                extractor,
                reference,
                n=n,
                batch_size=batch_size,
                seed=seed,
                decode=(lambda z: decode_latents(decoder, z)) if decoder is not None else None,
                decoded_by=decoder.name if decoder is not None else None,
                on_batch=lambda k: progress.advance(task, k),
            )
        result = {"checkpoint": str(checkpoint), "step": loaded.step, **scores.to_dict()}
        atomic_write_json(out, result)
    console.print(scores.summary())
    console.print(f"wrote {out}")
