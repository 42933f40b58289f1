"""Rich renderings shared by commands: the resolved config and the evaluation table."""

import math
import os
from typing import TYPE_CHECKING

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from zoo.config.loading import config_to_toml
from zoo.config.schema import ZooConfigBody

if TYPE_CHECKING:  # zoo.evaluation imports torch; the CLI imports it only in the commands that need it
    from zoo.evaluation import EvalReport


PIPED_WIDTH = 160


def make_console(**kwargs) -> Console:
    """A command's rich console.  Piped into a file or a CI log there is no terminal to measure
    and rich would use 80 columns, cutting wide tables into "…"; use PIPED_WIDTH there instead
    (an explicit COLUMNS still wins)."""
    console = Console(**kwargs)
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(width=PIPED_WIDTH, **kwargs)


def print_config(console: Console, cfg: ZooConfigBody, title: str = "resolved config") -> None:
    console.rule(title)
    console.print(Syntax(config_to_toml(cfg), "toml", theme="ansi_dark", background_color="default"))


def estimate_text(value: float, stderr: float) -> str:
    """value ± s.e., both to the s.e.'s second significant digit."""
    digits = max(0, 1 - math.floor(math.log10(stderr))) if stderr > 0 else 4
    return f"{value:.{digits}f} ± {stderr:.{digits}f}"


FEATURE_COLUMNS = {"fd": "FD", "kid": "KID", "precision": "precision", "recall": "recall"}


def eval_table(runs: "list[tuple[str, EvalReport]]", title: str) -> Table:
    """Every row of one or several named evaluations (of one dataset, at one n): feature scores
    when there are any, class fidelity for class-conditional models, energy distance always; the
    best row of each run by its headline metric in bold."""
    from zoo.evaluation import value_of

    first = runs[0][1]
    table = Table(title=title)
    if len(runs) > 1:
        table.add_column("run")
    table.add_column("sampler")
    table.add_column("NFE", justify="right")
    scored = [name for name in FEATURE_COLUMNS if first.rows and name in first.rows[0].scores]
    for name in scored:
        table.add_column(f"{FEATURE_COLUMNS[name]} ± s.e.", justify="right")
    fidelity = any(row.class_fidelity is not None for _, report in runs for row in report.rows)
    if fidelity:
        table.add_column("class fidelity", justify="right")
    table.add_column("energy distance ± s.e.", justify="right")
    if any(report.fid is not None for _, report in runs):
        table.add_column("FID", justify="right")

    def cells(row) -> list[str]:
        out = [row.method if row.guidance == 1.0 else f"{row.method}, guidance {row.guidance:g}"]
        out.append(str(row.nfe) if row.kind != "data" else "–")
        out += [estimate_text(row.scores[name].value, row.scores[name].stderr) for name in scored]
        if fidelity:
            c = row.class_fidelity
            out.append(estimate_text(c.value, c.stderr) if c is not None else "–")
        out.append(estimate_text(row.energy_distance, row.stderr))
        if any(report.fid is not None for _, report in runs):
            out.append(f"{row.fid:.3f}" if row.fid is not None else "")
        return out

    for name, report in runs:
        metric = report.headline_metric
        best = min((value_of(r, metric)[0] for r in report.rows), default=None)
        for row in report.rows:
            style = "bold green" if value_of(row, metric)[0] == best else ""
            table.add_row(*([name] if len(runs) > 1 else []), *cells(row), style=style)
    floor = first.noise_floor
    if floor:
        label = [f"(n={first.n_samples})"] if len(runs) > 1 else []
        floor_cells = cells(floor)
        floor_cells[0] = "data vs data (floor)"
        table.add_row(*label, *floor_cells, style="dim")
    table.caption = f"n = {first.n_samples} samples per row" + (
        f"; features: {first.features}" if first.features else ""
    )
    return table
