"""`zoo sample CKPT --nfe K --n 64 --out FILE`: a picture and an .npz of generated samples."""

import io
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zoo.output_paths import check_writable_dir, check_writable_file
from zoo.runs import atomic_write_bytes
from zoo_cli.errors import fail, user_errors
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
    nfe: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="network evaluations (default: 1 = one-step MeanFlow; when integrating the ODE, "
            "the run's largest eval.solver_nfe, rounded up to the solver's calls per step)",
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="number of samples")] = 64,
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
        int | None, typer.Option("--class", help="class label for class-conditional models")
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="classifier-free guidance scale (1 = none; default: the run's eval.guidance)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    raw: Annotated[bool, typer.Option("--raw", help="use the raw weights instead of the EMA")] = False,
    threads: Annotated[
        int, typer.Option(min=0, help="CPU threads (0 = torch default; 1 on a shared machine)")
    ] = 0,
) -> None:
    """Generate samples from a checkpoint."""
    checkpoint = resolve_checkpoint_path(checkpoint)
    with user_errors():
        # Everything the user typed is checked before the checkpoint is read and the samples drawn.
        if solver not in (None, "meanflow"):
            check_method_args(nfe, solver)
        if out is not None:
            if out.suffix.lower() != ".png":
                raise fail(f"--out must end in .png, got {out}")
            check_writable_file(out, "--out")
            check_writable_file(out.with_suffix(".npz"), "--out")
        elif checkpoint.is_file():  # (a missing checkpoint is reported as such by load_model)
            check_writable_dir(checkpoint.parent / "samples", "--out")

    import numpy as np
    import torch

    from zoo.devices import resolve_device
    from zoo.inference import load_model
    from zoo.plotting import save_image_grid, save_scatter
    from zoo.solvers.samplers import sample_meanflow, sample_ode

    with user_errors():
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        loaded = load_model(checkpoint, dev, use_ema=not raw)
        model = loaded.model
        if guidance not in (None, 1.0) and not model.num_classes:
            raise fail(f"--guidance {guidance} needs a class-conditional model; this one is unconditional")
        if guidance is None:  # as the run's training grids and `zoo eval` sample it
            guidance = loaded.cfg.eval.guidance if model.num_classes else 1.0
        if label is not None and not model.num_classes:
            raise fail("--class given, but this model is unconditional")
        if label is not None and not 0 <= label < model.num_classes:
            raise fail(f"--class must be in 0..{model.num_classes - 1}, got {label}")
        method = choose_method(loaded.cfg.eval, loaded.is_meanflow, nfe, solver)
        out = out or checkpoint.parent / "samples" / f"{checkpoint.stem}_{method.kind}_{method.nfe}nfe.png"
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *model.data_shape), generator=generator).to(dev)
        labels = None
        if model.num_classes:
            labels = (
                torch.full((n,), label, dtype=torch.long)
                if label is not None
                else torch.randint(0, model.num_classes, (n,), generator=generator)
            ).to(dev)
        with torch.no_grad():
            if method.kind == "meanflow":
                samples = sample_meanflow(model, noise, method.steps, y=labels, guidance=guidance)
            else:
                samples = sample_ode(model, noise, method.kind, method.steps, y=labels, guidance=guidance)
        samples = samples.float().cpu()
        out.parent.mkdir(parents=True, exist_ok=True)
        if len(model.data_shape) == 1:
            save_scatter(samples, out, title=f"{method.label} ({method.nfe} NFE), step {loaded.step}")
        else:
            save_image_grid(samples, out)
        arrays = {
            "samples": samples.numpy(),
            "nfe": np.array(method.nfe),
            "step": np.array(loaded.step),
            "guidance": np.array(guidance),
        }
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        atomic_write_bytes(out.with_suffix(".npz"), npz.getvalue())
    guided = f", guidance {guidance:g}" if guidance != 1.0 else ""
    console.print(
        f"wrote {out} and {out.with_suffix('.npz')} ({n} samples, {method.label}, {method.nfe} NFE{guided})"
    )
