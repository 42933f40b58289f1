"""Overrides that make a `zoo train moons` run small enough for a test (tiny MLP, small eval)."""

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

TINY_RUN = [
    "model.hidden=64",
    "model.depth=2",
    "train.batch_size=64",
    "train.log_every=5",
    "train.save_every=10",
    "eval.n_samples=200",
    "eval.batch_size=200",
    "eval.meanflow_steps=[1]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]",
    "loss.jvp=nograd",
    "experiment_log=",
    "device=cpu",
]


def logged_losses(run_dir: Path) -> list[float]:
    """The train/loss records of a finished run's metrics.jsonl, in order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def train_moons_variants(
    app: typer.Typer, common: list[str], variants: dict[str, list[str]]
) -> dict[str, tuple[list[float], str]]:
    """`zoo train moons COMMON EXTRA --run-name NAME` for each NAME: EXTRA, in the current folder:
    each run's logged losses and its output (a run that fails fails the test)."""
    runs = {}
    for name, extra in variants.items():
        result = CliRunner().invoke(app, ["train", "moons", *common, *extra, "--run-name", name])
        assert result.exit_code == 0, result.output
        runs[name] = logged_losses(Path("outputs") / name), result.output
    return runs
