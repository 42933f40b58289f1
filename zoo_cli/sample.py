"""`zoo sample CKPT --nfe K --n 64 --out FILE`: a picture and an .npz of generated samples."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zoo_cli.errors import fail, user_errors
from zoo_cli.render import make_console

if TYPE_CHECKING:
    from zoo.evaluation import Method

console = make_console()


def choose_method(meanflow: bool, nfe: int, solver: str | None) -> "Method":
    """MeanFlow models take NFE jumps; flow-matching models (or --solver) integrate the ODE."""
    from zoo.evaluation import Method
    from zoo.solvers.ode import get_solver, steps_for_nfe

    if solver is None and meanflow:
        return Method("meanflow", nfe, nfe)
    name = solver or "euler"
    try:
        return Method(name, steps_for_nfe(get_solver(name), nfe), nfe)
    except ValueError as exc:
        raise fail(str(exc)) from None


def sample(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint (outputs/RUN/last.pt or step_XXXXXXX.pt)")],
    nfe: Annotated[int, typer.Option(min=1, help="network evaluations: 1 = one-step MeanFlow")] = 1,
    n: Annotated[int, typer.Option("--n", min=1, help="number of samples")] = 64,
    out: Annotated[Path | None, typer.Option(help="PNG to write (an .npz of the samples goes beside it)")] = None,
    solver: Annotated[str | None, typer.Option(help="integrate the ODE with euler|midpoint|heun|rk4 instead of MeanFlow jumps")] = None,
    label: Annotated[int | None, typer.Option("--class", help="class label for class-conditional models")] = None,
    guidance: Annotated[float, typer.Option(min=0.0, help="classifier-free guidance scale (1 = none)")] = 1.0,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    raw: Annotated[bool, typer.Option("--raw", help="use the raw weights instead of the EMA")] = False,
) -> None:
    """Generate samples from a checkpoint."""
    import numpy as np
    import torch

    from zoo.devices import resolve_device
    from zoo.inference import load_model
    from zoo.plotting import save_image_grid, save_scatter
    from zoo.solvers.samplers import sample_meanflow, sample_ode

    with user_errors():
        dev = resolve_device(device)
        loaded = load_model(checkpoint, dev, use_ema=not raw)
        model = loaded.model
        if guidance != 1.0 and not model.num_classes:
            raise fail(f"--guidance {guidance} needs a class-conditional model; this one is unconditional")
        if label is not None and not model.num_classes:
            raise fail("--class given, but this model is unconditional")
        if label is not None and not 0 <= label < model.num_classes:
            raise fail(f"--class must be in 0..{model.num_classes - 1}, got {label}")
        method = choose_method(loaded.is_meanflow, nfe, solver)
        out = out or checkpoint.parent / "samples" / f"{checkpoint.stem}_{method.kind}_{nfe}nfe.png"
        if out.suffix.lower() != ".png":
            raise fail(f"--out must end in .png, got {out}")
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
            save_scatter(samples, out, title=f"{method.label} ({nfe} NFE), step {loaded.step}")
        else:
            save_image_grid(samples, out)
        arrays = {"samples": samples.numpy(), "nfe": np.array(nfe), "step": np.array(loaded.step)}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        np.savez(out.with_suffix(".npz"), **arrays)
    console.print(f"wrote {out} and {out.with_suffix('.npz')} ({n} samples, {method.label}, {nfe} NFE)")
