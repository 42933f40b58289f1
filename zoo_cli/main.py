"""The `zoo` executable.

Commands import torch (and the models, data, matplotlib) inside their bodies, not at the top of
their modules: `zoo --help`, `zoo ckpts`, `zoo sync` and `zoo clean` then start in a fraction of a
second instead of paying torch's import (tests/test_cli_startup.py keeps it so).
"""

import typer

from zoo_cli import runs_cmds
from zoo_cli.bench import bench_jvp
from zoo_cli.data import app as data_app
from zoo_cli.evaluate import eval_command
from zoo_cli.features import app as features_app
from zoo_cli.fid import fid_command
from zoo_cli.modal import app as modal_app
from zoo_cli.sample import sample
from zoo_cli.train import train

app = typer.Typer(
    name="zoo",
    help="Flow matching and MeanFlow: train, sample, evaluate, benchmark, run remotely.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command(help="Train a model from a preset or TOML file, with key=value overrides.")(train)
app.command(help="Generate samples from a checkpoint (PNG + .npz).")(sample)
app.command(
    "eval",
    help="Every sampler's quality vs NFE (images: FD, KID, precision, recall in a classifier's features; "
    "energy distance) beside the data floor; several runs compared in one table; FID with --fid.",
)(eval_command)
app.command(
    "fid",
    help="FID and Inception Score of a checkpoint's samples (decoded) against a reference: ADM's "
    "ImageNet-256 batch or an image folder.",
)(fid_command)
app.command(
    "bench-jvp", help="Time forward, JVP, flow-matching and MeanFlow steps per JVP mode; name the fastest."
)(bench_jvp)
app.add_typer(modal_app, name="modal")
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
runs_cmds.register(app)


if __name__ == "__main__":
    app()
