"""`zoo sample CKPT --nfe K --n 64 --out FILE`: a picture and an .npz of generated samples.

Latent models' samples are decoded by the VAE that encoded their training data: the picture and
the .npz show images (`--latents` keeps the raw latents in the .npz too).  `--classes 0-9`
draws the same number of samples of each class and lays the grid out one row per class.
"""

import io
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from zoo.config.schema import MAX_GUIDANCE, MAX_SAMPLE_BYTES, MAX_SAMPLES
from zoo.output_paths import check_writable_dir, check_writable_file
from zoo.runs import atomic_write_bytes
from zoo_cli.errors import fail, user_errors
from zoo_cli.options import DeviceOption, NfeOption, SeedOption, ThreadsOption
from zoo_cli.render import make_console

if TYPE_CHECKING:
    from zoo.config.schema import EvalConfig
    from zoo.evaluation import Method

console = make_console()


def check_method_args(nfe: int | None, solver: str | None) -> None:
    """A bad --solver or --nfe, refused before the checkpoint is read (its run's defaults come later)."""
    from zoo.evaluation import pick_method

    try:
        pick_method(False, solver, nfe, "euler", 1)
    except ValueError as exc:
        raise fail(str(exc)) from None


def choose_method(eval_cfg: "EvalConfig", meanflow: bool, nfe: int | None, solver: str | None) -> "Method":
    """MeanFlow models take NFE jumps (default 1); flow-matching models (or --solver) integrate
    the ODE with the run's own headline sampler (its first eval solver at its largest
    eval.solver_nfe): the one its training grids and `zoo eval` show, so the same run gives the
    same picture everywhere."""
    from zoo.evaluation import headline_method, headline_solver

    try:
        return headline_method(eval_cfg, meanflow, solver, nfe)
    except ValueError as exc:
        if solver is None and not meanflow:  # the solver came from the run, not from the command line
            raise fail(
                f"{exc} (the run's eval.solvers[0] is {headline_solver(eval_cfg)}; "
                "pass --solver euler for any NFE)"
            ) from None
        raise fail(str(exc)) from None


DEFAULT_N = 64
PER_CLASS_DEFAULT = 8


def parse_classes(text: str) -> list[int]:
    """'0-9', '1,5,207' or '0-3,10' -> class indices in the order given."""
    classes: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise fail(f"--classes takes class numbers and ranges like 0-9 or 1,5,207, got {text!r}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise fail(f"--classes range {part.strip()} runs backwards; write {high}-{low}")
        classes.extend(range(low, high + 1))
    return classes


def samples_per_class(n: int | None, classes: list[int]) -> int:
    """With --classes, --n counts all samples and must split evenly (default 8 per class)."""
    if n is None:
        return PER_CLASS_DEFAULT
    if n % len(classes):
        raise fail(
            f"--n {n} does not split evenly over the {len(classes)} classes given; pass a multiple of "
            f"{len(classes)} (e.g. --n {len(classes) * PER_CLASS_DEFAULT}) or leave --n out "
            f"({PER_CLASS_DEFAULT} per class)"
        )
    return n // len(classes)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'0.4,0.6' -> (0.4, 0.6): --guidance-interval's times, 0 <= a <= b <= 1."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise fail(f"--guidance-interval takes two times a,b such as 0.4,0.6, got {text!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise fail(f"--guidance-interval {text}: the times must satisfy 0 <= a <= b <= 1")
    return low, high


def resolve_checkpoint_path(checkpoint: Path) -> Path:
    """A run folder stands for its last.pt."""
    return checkpoint / "last.pt" if checkpoint.is_dir() else checkpoint


def sample(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="a checkpoint (outputs/RUN/last.pt or step_XXXXXXX.pt) or a run folder (its last.pt)"
        ),
    ],
    nfe: NfeOption = None,
    n: Annotated[
        int | None,
        typer.Option(
            "--n",
            min=1,
            max=MAX_SAMPLES,
            help=f"number of samples (default {DEFAULT_N}; {PER_CLASS_DEFAULT} per class with --classes; "
            f"at most {MAX_SAMPLES} and {MAX_SAMPLE_BYTES // 2**30} GiB of samples)",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="PNG to write (an .npz of the samples goes beside it)")
    ] = None,
    solver: Annotated[
        str | None,
        typer.Option(
            help="integrate the ODE with euler|midpoint|heun|rk4 instead of MeanFlow jumps "
            "(meanflow: the jumps; default for a flow-matching model: the run's first eval solver)"
        ),
    ] = None,
    label: Annotated[
        int | None, typer.Option("--class", min=0, help="class label for class-conditional models")
    ] = None,
    classes_text: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="classes to draw, e.g. 0-9 or 1,5,207: as many samples of each, one grid row per class",
        ),
    ] = None,
    keep_latents: Annotated[
        bool, typer.Option("--latents", help="latent models: keep the raw latents in the .npz too")
    ] = False,
    vae: Annotated[
        str | None,
        typer.Option(
            help="latent models: the VAE to decode with, a local folder or hub id (default: the run's "
            "data.vae, else the one its latents' meta.json records, else stabilityai/sd-vae-ft-ema)"
        ),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=MAX_GUIDANCE,
            help="guidance scale (1 = none; default: the run's eval.guidance): classifier-free, or the "
            "model's input for models trained with guidance as a condition (iMF)",
        ),
    ] = None,
    guidance_interval: Annotated[
        str | None,
        typer.Option(
            "--guidance-interval",
            help="times a,b (0 <= a <= b <= 1) guidance acts on, for models trained with guidance as a "
            "condition (iMF); default: the run's eval.guidance_interval, else 0,1",
        ),
    ] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    raw: Annotated[bool, typer.Option("--raw", help="use the raw weights instead of the EMA")] = False,
    threads: ThreadsOption = 0,
) -> None:
    """Generate samples from a checkpoint."""
    checkpoint = resolve_checkpoint_path(checkpoint)
    with user_errors():
        # Everything the user typed is checked before the checkpoint is read and the samples drawn.
        if label is not None and classes_text is not None:
            raise fail("give --class or --classes, not both")
        classes: list[int] | None = None  # given: the labels, class-major, per_class of each
        if classes_text is not None:
            classes = parse_classes(classes_text)
            per_class = samples_per_class(n, classes)
            n = len(classes) * per_class
        elif label is not None:
            n = n or DEFAULT_N
            classes, per_class = [label], n
        else:
            n = n or DEFAULT_N
        if solver not in (None, "meanflow"):
            check_method_args(nfe, solver)
        interval = parse_interval(guidance_interval)
        if out is not None:
            if out.suffix.lower() != ".png":
                raise fail(f"--out must end in .png, got {out}")
            check_writable_file(out, "--out")
            check_writable_file(out.with_suffix(".npz"), "--out")
        elif checkpoint.is_file():  # (a missing checkpoint is reported as such by load_model)
            check_writable_dir(checkpoint.parent / "samples", "--out")

    import numpy as np
    import torch

    from zoo.data.latents import is_latent_data, latent_vae_name, load_decoder
    from zoo.devices import resolve_device
    from zoo.evaluation import generate
    from zoo.inference import check_sample_count, load_model, resolve_run_guidance
    from zoo.models.vae import decode_latents
    from zoo.plotting import save_image_grid, save_scatter

    with user_errors():
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        loaded = load_model(checkpoint, dev, use_ema=not raw)
        model = loaded.model
        check_sample_count(n, model.data_shape)
        guidance = resolve_run_guidance(loaded, guidance, interval)
        option = "--class" if label is not None else "--classes"
        if classes is not None and not model.num_classes:
            raise fail(f"{option} given, but this model is unconditional")
        for k in classes or []:
            if not 0 <= k < model.num_classes:
                raise fail(f"{option} must be in 0..{model.num_classes - 1}, got {k}")
        decoder = None
        if is_latent_data(loaded.cfg.data):  # the VAE is loaded (or its absence reported) before sampling
            decoder = load_decoder(*latent_vae_name(loaded.cfg.data, vae), dev)
        elif vae is not None or keep_latents:
            option = "--vae" if vae is not None else "--latents"
            raise fail(f"{option} given, but this model generates pixels, not latents")
        method = choose_method(loaded.cfg.eval, loaded.is_meanflow, nfe, solver)
        out = out or checkpoint.parent / "samples" / f"{checkpoint.stem}_{method.kind}_{method.nfe}nfe.png"
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *model.data_shape), generator=generator).to(dev)
        labels = None
        if classes is not None:  # class-major: row k of the grid is classes[k]
            labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class).to(dev)
        elif model.num_classes:
            labels = torch.randint(0, model.num_classes, (n,), generator=generator).to(dev)
        batch_size = loaded.cfg.eval.batch_size
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"sampling ({method.label})", total=-(-n // batch_size))
            latents = generate(
                model, method, noise, labels, guidance, batch_size, on_batch=lambda: progress.advance(task)
            )
        samples = decode_latents(decoder, latents) if decoder is not None else latents
        out.parent.mkdir(parents=True, exist_ok=True)
        if len(model.data_shape) == 1:
            save_scatter(samples, out, title=f"{method.label} ({method.nfe} NFE), step {loaded.step}")
        else:
            save_image_grid(
                samples, out, nrow=per_class if classes is not None and len(classes) > 1 else None
            )
        arrays = {
            "samples": samples.numpy(),
            "nfe": np.array(method.nfe),
            "step": np.array(loaded.step),
            "guidance": np.array(guidance.scale),
        }
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        if decoder is not None:
            arrays["vae"] = np.array(decoder.name)
            if keep_latents:
                arrays["latents"] = latents.numpy()
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        atomic_write_bytes(out.with_suffix(".npz"), npz.getvalue())
    guided = f", guidance {guidance.scale:g}" if guidance.scale != 1.0 else ""
    if guidance.interval is not None:
        guided += f" on [{guidance.interval[0]:g}, {guidance.interval[1]:g}]"
    decoded = f", decoded by {decoder.name}" if decoder is not None else ""
    console.print(
        f"wrote {out} and {out.with_suffix('.npz')} ({n} samples, {method.label}, {method.nfe} NFE{guided}"
        f"{decoded})"
    )
