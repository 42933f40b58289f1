"""Print a run's eval.json as the README's results table (Markdown).

    python scripts/readme_table.py outputs/RUN/eval.json

One column per metric in METRICS that the JSON has: a new metric is one more line there (its
value key and standard-error key in eval.json's rows).
"""

import json
import sys
from pathlib import Path

# (column header, value key, standard-error key) in eval.json's rows.
METRICS = [
    ("energy distance", "energy_distance", "stderr"),
]


def cell(row: dict, value_key: str, stderr_key: str) -> str:
    if value_key not in row:
        return "–"
    stderr = row.get(stderr_key)
    return f"{row[value_key]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def table(report: dict) -> str:
    rows = list(report["rows"])
    if report.get("noise_floor"):  # what a perfect model would score at the same n
        rows.append({**report["noise_floor"], "method": "data vs data (floor)"})
    metrics = [m for m in METRICS if any(m[1] in row for row in rows)]
    n = report["n_samples"]
    header = ["sampler", "NFE"] + [f"{name} (n={n}, ± s.e.)" for name, _, _ in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        nfe = str(row["nfe"]) if row["nfe"] else "–"
        cells = [row["method"], nfe] + [cell(row, value, stderr) for _, value, stderr in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/readme_table.py outputs/RUN/eval.json")
    path = Path(sys.argv[1])
    report = json.loads(path.read_text())
    print(f"{report['checkpoint']} (step {report['step']}), {path}")
    print(table(report))


if __name__ == "__main__":
    main()
