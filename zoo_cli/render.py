"""Rich renderings shared by commands: the resolved config and the evaluation table."""

import os
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from zoo.config.loading import config_to_toml
from zoo.config.schema import ZooConfigBody

if TYPE_CHECKING:  # zoo.evaluation imports torch; the CLI imports it only in the commands that need it
    from zoo.evaluation import EvalReport


PIPED_WIDTH = 160
CLOSED_OUTPUT_NOTICE = (
    "note: standard output was closed by its reader (e.g. `| head`); carrying on without it "
    "(a run still trains, saves and writes its run folder)"
)


class OutputMayCloseConsole(Console):
    """A console on standard output that outlives its reader.  `zoo train ... | head -1` closes
    the pipe after one line: rich's default then exits 1 at the next write, silently, which
    would throw a run away for the sake of a log line.  Instead, say so once on stderr and send
    the rest of standard output nowhere."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        Console(stderr=True, soft_wrap=True).print(CLOSED_OUTPUT_NOTICE, markup=False, highlight=False)


def make_console(**kwargs) -> Console:
    """A command's rich console.  Piped into a file or a CI log there is no terminal to measure
    and rich would use 80 columns, cutting wide tables into "…"; use PIPED_WIDTH there instead
    (an explicit COLUMNS still wins)."""
    console = OutputMayCloseConsole(**kwargs)
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return OutputMayCloseConsole(width=PIPED_WIDTH, **kwargs)


def print_config(console: Console, cfg: ZooConfigBody, title: str = "resolved config") -> None:
    console.rule(title)
    console.print(Syntax(config_to_toml(cfg), "toml", theme="ansi_dark", background_color="default"))


def eval_table(runs: "list[tuple[str, EvalReport]]", title: str) -> Table:
    """Every row of one or several named evaluations (of one dataset, at one n), the first's
    data-vs-data floor last; the best row of each run by its headline metric (FD for images,
    else energy distance: the best sampler and guidance scale) in bold, marked "best" and named
    in the caption."""
    from zoo.evaluation import METRIC_NAMES, row_cells, table_columns

    reports = [report for _, report in runs]
    columns = table_columns(reports)
    several = len(runs) > 1
    bests = []
    for name, report in runs:
        best = report.best_row
        if best is not None:
            guided = f", guidance {best.guidance:g}" if best.guidance != 1.0 else ""
            who = f"{name}: " if several else ""
            bests.append(f"{who}{best.method}{guided} (lowest {METRIC_NAMES[report.headline_metric]})")
    caption = f"n = {reports[0].n_samples} samples per row" + "".join(f"\nbest: {b}" for b in bests)
    table = Table(title=title, caption=caption)
    for column in ["run"] * several + columns:
        table.add_column(column, justify="left" if column in ("run", "sampler") else "right")
    for name, report in runs:
        best = report.best_row
        for row in report.rows:
            cells = row_cells(row, columns)
            if row is best:
                cells[0] += "  ← best"
            table.add_row(*[name] * several, *cells, style="bold green" if row is best else "")
    floor = reports[0].noise_floor
    if floor:
        table.add_row(*["–"] * several, *row_cells(floor, columns), style="dim")
    return table
