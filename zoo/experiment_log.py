"""EXPERIMENT_LOG.md: each finished `zoo train` run appends what it ran and what it measured."""

import fcntl
import time
from pathlib import Path

from zoo.config.schema import ZooConfigBody
from zoo.evaluation import EvalReport, row_cells, table_columns
from zoo.runs import RunDir

HEADER = "# Experiment log\n\nThe research record: one entry per experiment, newest last.\n"


def config_summary(cfg: ZooConfigBody) -> str:
    loss = cfg.loss
    parts = [
        f"data={cfg.data.name}",
        f"model={cfg.model.arch}",
        f"loss={loss.kind}",
    ]
    if loss.average_velocity:
        parts += [f"ratio={loss.ratio}", f"p={loss.weight_p}", f"c={loss.weight_c}", f"jvp={loss.jvp}"]
    parts += [
        f"time={loss.time_sampler}({loss.time_mu},{loss.time_sigma})"
        if loss.time_sampler == "logit_normal"
        else "time=uniform",
        f"steps={cfg.train.steps}",
        f"batch={cfg.train.batch_size}",
        f"lr={cfg.optim.lr}",
        f"ema={cfg.train.ema_decay}",
        f"seed={cfg.seed}",
        f"device={cfg.device}",
        f"precision={cfg.precision}",
    ]
    return ", ".join(parts)


def report_table(report: EvalReport) -> str:
    """The evaluation as a markdown table, its n and (for images) the feature network below it."""
    columns = table_columns([report])
    rows = report.rows + ([report.noise_floor] if report.noise_floor else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row_cells(row, columns)) + " |" for row in rows]
    lines += [
        "",
        f"n = {report.n_samples} samples per row"
        + (f"; features: {report.features}" if report.features else ""),
    ]
    return "\n".join(lines)


def append_run_entry(
    path: Path,
    command: str,
    cfg: ZooConfigBody,
    run: RunDir,
    report: EvalReport,
    final_metrics: dict[str, float],
) -> None:
    entry = "\n".join(
        [
            f"\n## {time.strftime('%Y-%m-%d %H:%M')} — run `{cfg.run_name}`",
            "",
            f"- command: `{command}`",
            f"- config: {config_summary(cfg)}",
            f"- run folder: `{run.root}`",
            "- final train metrics: "
            + (", ".join(f"{k} {v:.5g}" for k, v in sorted(final_metrics.items())) or "n/a"),
            "",
            report_table(report),
            "",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two runs finishing together must not interleave
        handle.seek(0)
        if not handle.read(1):
            handle.write(HEADER)
        handle.write(entry)
        fcntl.flock(handle, fcntl.LOCK_UN)
