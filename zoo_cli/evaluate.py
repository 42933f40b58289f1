"""`zoo eval CKPT`: energy distance to held-out data for every sampler, as a table and JSON."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from zoo.runs import atomic_write_json
from zoo_cli.errors import user_errors
from zoo_cli.render import eval_table, make_console

console = make_console()


def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint (outputs/RUN/last.pt or step_XXXXXXX.pt)")],
    n: Annotated[int | None, typer.Option("--n", min=16, help="samples per metric (default: the run's eval.n_samples)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="where to write the results (default: beside the checkpoint)")] = None,
    seed: Annotated[int, typer.Option(help="noise seed: two seeds give two independent evaluations")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    data_root: Annotated[str | None, typer.Option("--data-dir", help="dataset folder, if not the run's data.root")] = None,
) -> None:
    """Evaluate a checkpoint: MeanFlow 1/2/4 steps and ODE solvers at several NFE."""
    from zoo.data import build_data
    from zoo.devices import resolve_device
    from zoo.evaluation import evaluate
    from zoo.inference import load_model

    with user_errors():
        dev = resolve_device(device)
        loaded = load_model(checkpoint, dev)
        cfg = loaded.cfg
        eval_cfg = cfg.eval.model_copy(update={"n_samples": n}) if n else cfg.eval
        data_cfg = cfg.data.model_copy(update={"root": data_root}) if data_root else cfg.data
        source = build_data(data_cfg, dev, cfg.seed, batch_size=eval_cfg.batch_size)
        with Progress(console=Console(stderr=True), transient=True) as progress:
            report = evaluate(loaded.model, source, eval_cfg, meanflow=loaded.is_meanflow, seed=seed, progress=progress)
        json_out = json_out or checkpoint.with_name(f"eval_{checkpoint.stem}_seed{seed}.json")
        atomic_write_json(json_out, {"checkpoint": str(checkpoint), "step": loaded.step, "seed": seed, **report.to_dict()})
    console.print(eval_table(report, title=f"{checkpoint} (step {loaded.step}, EMA weights)"))
    console.print(f"wrote {json_out}")
