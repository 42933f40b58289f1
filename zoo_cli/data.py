"""`zoo data encode-latents DATASET --split train|val`: image folders into VAE latents.

Here (CPU or CUDA) with a progress bar, or with --modal as a detached job on a Modal GPU that
reads the images from the Volume's data/ folder and writes the latents beside them.  Either way
the work is done in shards: running the same command again after an interruption encodes only
what is missing (zoo.data.encode).
"""

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zoo.config.schema import MAX_BATCH, MAX_SEED
from zoo.remote.layout import DEFAULT_VOLUME
from zoo_cli.errors import fail, user_errors
from zoo_cli.options import DeviceOption, ThreadsOption
from zoo_cli.render import make_console

if TYPE_CHECKING:
    from zoo.data.encode import EncodeSettings

console = make_console()

app = typer.Typer(
    name="data",
    help="Prepare datasets: encode image folders into VAE latents.",
    no_args_is_help=True,
)

SPLITS = ("train", "val")


@app.command("encode-latents")
def encode_latents(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="image folder: DATASET/SPLIT when that exists (data/imagenet -> data/imagenet/train), else "
            "DATASET itself; class folders (<class>/*.JPEG) or a flat folder of images (CelebA). "
            "With --modal, a folder under the Volume's data/ (e.g. imagenet)"
        ),
    ],
    split: Annotated[str, typer.Option(help="train or val: names the output files (and the subfolder)")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="latents folder (default: DATASET-latents beside DATASET, e.g. data/imagenet-latents)"
        ),
    ] = None,
    image_size: Annotated[
        int, typer.Option(min=8, max=4096, help="side of the square images encoded (256 for ImageNet-256)")
    ] = 256,
    crop: Annotated[
        int | None,
        typer.Option(
            min=8, max=65536, help="centre square cropped before resizing (default: the shorter side)"
        ),
    ] = None,
    vae: Annotated[
        str,
        typer.Option(
            help="the VAE: a hub id or a local folder with config.json + weights (--modal: a hub id or a "
            "folder under the Volume's data/)"
        ),
    ] = "stabilityai/sd-vae-ft-ema",
    flip: Annotated[
        bool, typer.Option("--flip", help="also encode every image mirrored (twice the latents)")
    ] = False,
    posterior: Annotated[
        str, typer.Option(help="sample: a draw of the VAE's posterior (DiT's choice); mean: its mean")
    ] = "sample",
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="seed of the posterior draws")] = 0,
    shard_size: Annotated[
        int,
        typer.Option(min=1, max=1 << 20, help="images per shard (the unit of work an interruption can lose)"),
    ] = 1024,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="images per VAE call")] = 32,
    num_workers: Annotated[int, typer.Option(min=0, max=64, help="processes decoding image files")] = 4,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1, max=10**9, help="encode an evenly spread subset of this many images (a trial run)"
        ),
    ] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = 0,
    modal: Annotated[
        bool, typer.Option("--modal", help="run on a Modal GPU, reading and writing the Volume's data/")
    ] = False,
    gpu: Annotated[str, typer.Option(help="--modal: the GPU (A10G, A100-40GB, H100, ...)")] = "A10G",
    timeout: Annotated[str, typer.Option(help="--modal: per attempt, at most 24h")] = "12h",
    volume: Annotated[str, typer.Option("--volume", help="--modal: the Modal Volume")] = DEFAULT_VOLUME,
) -> None:
    """Encode an image folder into latents (centre crop, resize, VAE), resumable."""
    from zoo.data.encode import EncodeSettings

    if split not in SPLITS:
        raise fail(f"--split must be train or val, got {split!r}")
    try:
        settings = EncodeSettings(
            image_size=image_size,
            crop=crop,
            vae=vae,
            flip_copies=flip,
            posterior=posterior,
            seed=seed,
            shard_size=shard_size,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    if modal:
        submit_remote(dataset, split, out, settings, batch_size, num_workers, limit, gpu, timeout, volume)
        return
    encode_here(dataset, split, out, settings, batch_size, num_workers, limit, device, threads)


def encode_here(
    dataset: Path,
    split: str,
    out: Path | None,
    settings: "EncodeSettings",
    batch_size: int,
    num_workers: int,
    limit: int | None,
    device: str,
    threads: int,
) -> None:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from zoo.data.encode import default_out, encode_folder
    from zoo.devices import resolve_device

    out = out or default_out(dataset)
    with user_errors():
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=make_console(stderr=True),
            transient=False,
        )
        task = None

        def start(total: int, done: int) -> None:
            nonlocal task
            if done:
                console.print(f"resuming: {done} of {total} images already encoded in {out}")
            progress.start()
            task = progress.add_task(f"encoding {split}", total=total, completed=done)

        try:
            summary = encode_folder(
                dataset,
                split,
                out,
                settings,
                device=dev,
                batch_size=batch_size,
                num_workers=num_workers,
                limit=limit,
                on_start=start,
                on_items=lambda k: progress.advance(task, k),
            )
        finally:
            if task is not None:  # a progress display never started would still print a blank line
                progress.stop()
    console.print(
        f"wrote {out}/{split}_latents.npy: {summary['items']} latents {tuple(summary['latent_shape'])} of "
        f"{summary['images']} images{' and their mirror images' if settings.flip_copies else ''}, "
        f"{summary['shards_encoded']} shards encoded in {summary['seconds']:.0f} s (VAE {summary['vae']}, "
        f"scale {summary['scale']:g})"
    )


def submit_remote(
    dataset: Path,
    split: str,
    out: Path | None,
    settings: "EncodeSettings",
    batch_size: int,
    num_workers: int,
    limit: int | None,
    gpu: str,
    timeout: str,
    volume: str,
) -> None:
    """Check everything typed, then start the encode job detached on Modal."""
    from zoo.remote.credentials import ModalUnavailable, check_modal_ready
    from zoo.remote.encode_job import encode_request
    from zoo.remote.status import parse_duration
    from zoo.remote.submission import check_timeout, parse_gpu

    try:
        gpu_request = parse_gpu(gpu)
        timeout_s = check_timeout(parse_duration(timeout))
        request = encode_request(
            dataset, split, out, settings, batch_size=batch_size, num_workers=num_workers, limit=limit
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        check_modal_ready()
    except ModalUnavailable as exc:
        raise fail(str(exc), 1) from None
    from zoo.remote.modal_app import ModalSpec, build_encode_app, spawn_encode

    spec = ModalSpec(request["app_name"], gpu_request, timeout_s, retries=3, volume_name=volume)
    command = "zoo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    call_id, app_id = spawn_encode(build_encode_app(spec), request, volume)
    console.print(f"encode job  {request['app_name']} (call {call_id}, app {app_id})")
    console.print(f"reads       volume {volume}: {request['dataset']}  ->  writes {request['out']}")
    console.print(f"follow it   modal app logs {app_id}   (run `{command}` again to resume it if it stops)")
