"""Print an eval.json as the README's results table (Markdown).

    python scripts/readme_table.py outputs/RUN/eval.json

One column per metric in METRICS that the JSON has: a new metric is one more line there (the path
to its value and to its standard error in eval.json's rows, and how many digits to print).
Energy distance stays in the JSON but is no column when feature-space metrics are there.
"""

import json
import sys
from pathlib import Path

# (column header, path to the value, path to the standard error, format) in eval.json's rows.
METRICS = [
    ("FD", ("scores", "fd", "value"), ("scores", "fd", "stderr"), ".1f"),
    ("KID", ("scores", "kid", "value"), ("scores", "kid", "stderr"), ".2f"),
    ("precision", ("scores", "precision", "value"), ("scores", "precision", "stderr"), ".3f"),
    ("recall", ("scores", "recall", "value"), ("scores", "recall", "stderr"), ".3f"),
]
ENERGY_DISTANCE = ("energy distance", ("energy_distance",), ("stderr",), ".4f")


def lookup(row: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return row


def cell(row: dict, metric: tuple) -> str:
    _, value_path, stderr_path, fmt = metric
    value, stderr = lookup(row, value_path), lookup(row, stderr_path)
    if value is None:
        return "–"
    return f"{value:{fmt}}" + (f" ± {stderr:{fmt}}" if stderr is not None else "")


def table(report: dict) -> str:
    rows = list(report["rows"])
    if report.get("noise_floor"):  # what a perfect model would score at the same n
        rows.append({**report["noise_floor"], "method": "data vs data (floor)"})
    metrics = [m for m in METRICS if any(lookup(row, m[1]) is not None for row in rows)] or [ENERGY_DISTANCE]
    n = report["n_samples"]
    header = ["sampler", "NFE"] + [f"{m[0]} (± s.e.)" for m in metrics]
    lines = [f"n = {n} samples per row.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        nfe = str(row["nfe"]) if row["nfe"] else "–"
        lines.append("| " + " | ".join([row["method"], nfe] + [cell(row, m) for m in metrics]) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/readme_table.py outputs/RUN/eval.json")
    path = Path(sys.argv[1])
    report = json.loads(path.read_text())
    print(f"{report.get('checkpoint', path.parent.name)} (step {report.get('step', '?')}), {path}")
    print(table(report))


if __name__ == "__main__":
    main()
