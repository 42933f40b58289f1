"""EXPERIMENT_LOG.md: each finished `zoo train` run appends what it ran and what it measured."""

import fcntl
import time
from pathlib import Path

from zoo.config.schema import ZooConfigBody
from zoo.evaluation import EvalReport
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
    lines = [
        f"| sampler | NFE | energy distance (n={report.n_samples}) |",
        "|---|---|---|",
    ]
    for row in report.rows:
        lines.append(f"| {row.method} | {row.nfe} | {row.energy_distance:.5f} ± {row.stderr:.5f} |")
    if report.noise_floor:
        floor = report.noise_floor
        lines.append(f"| data vs data (floor) | – | {floor.energy_distance:.5f} ± {floor.stderr:.5f} |")
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
