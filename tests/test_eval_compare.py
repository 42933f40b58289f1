"""Quality vs NFE and comparing runs: `zoo eval RUN_A RUN_B` evaluates each run exactly as alone
and puts them in one table, one JSON and one plot with a line per run and sampler family."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_runs import TINY_RUN, train_moons_variants
from typer.testing import CliRunner

from zoo.evaluation import EvalReport, EvalRow, quality_curves, save_quality_plot
from zoo_cli.main import app

runner = CliRunner()

# matplotlib's first four default line colours, as drawn (opaque)
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def coloured_pixels(path: Path, colour: tuple[int, int, int]) -> int:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(colour)).sum(-1) <= 6).sum())


def row(kind: str, steps: int, nfe: int, value: float) -> EvalRow:
    return EvalRow(f"{kind} {steps}", kind, steps, nfe, value, 0.1 * value)


def test_quality_plot_draws_one_line_per_sampler_family(tmp_path):
    report = EvalReport(
        n_samples=100,
        rows=[
            row("meanflow", 1, 1, 3.0),
            row("meanflow", 2, 2, 2.0),
            row("euler", 2, 2, 4.0),
            row("euler", 8, 8, 1.0),
            row("heun", 1, 2, 3.5),
            row("heun", 4, 8, 0.8),
        ],
        noise_floor=row("data", 0, 0, 0.1),
    )
    curves = quality_curves(report, "energy_distance")
    assert [(label, nfes) for label, nfes, *_ in curves] == [
        ("MeanFlow", [1, 2]),
        ("Euler", [2, 8]),
        ("Heun", [2, 8]),
    ]
    assert curves[1][2:] == ([4.0, 1.0], [pytest.approx(0.4), pytest.approx(0.1)])
    path = tmp_path / "q.png"
    save_quality_plot([("run", report)], path, title="t")
    drawn = [coloured_pixels(path, colour) for colour in LINE_COLOURS]
    assert all(count > 200 for count in drawn[:3]), drawn  # three lines ...
    assert drawn[3] == 0, drawn  # ... and no fourth


@pytest.fixture(scope="module")
def moons_runs(tmp_path_factory) -> Path:
    """A MeanFlow and a flow-matching run of the tiny moons setup, and a MeanFlow run on another
    dataset, each trained 10 steps."""
    root = tmp_path_factory.mktemp("compare")
    common = [*TINY_RUN, "tracking.enabled=false", "--steps", "10", "--threads", "1"]
    with contextlib.chdir(root):
        train_moons_variants(
            app, common, {"mf": [], "fm": ["loss.kind=flow_matching"], "ck": ["data.name=checkerboard"]}
        )
    return root / "outputs"


@pytest.mark.slow  # with its fixture: three 10-step moons runs and three evaluations, about 10 s
def test_two_runs_in_one_table_json_and_plot(moons_runs, tmp_path):
    joint = tmp_path / "both.json"
    both = runner.invoke(app, ["eval", str(moons_runs / "mf"), str(moons_runs / "fm"), "--json", str(joint)])
    assert both.exit_code == 0, both.output
    alone = runner.invoke(
        app, ["eval", str(moons_runs / "mf" / "last.pt"), "--json", str(tmp_path / "mf.json")]
    )
    assert alone.exit_code == 0, alone.output

    data = json.loads(joint.read_text())
    assert [r["name"] for r in data["runs"]] == ["mf", "fm"]
    mf, fm = (run["rows"] for run in data["runs"])
    assert {r["kind"] for r in mf} == {"meanflow", "euler"} and {r["kind"] for r in fm} == {"euler"}
    # Evaluated exactly as alone (same seed, same noise): the same numbers.
    assert mf == json.loads((tmp_path / "mf.json").read_text())["rows"]
    # Each run also gets its own evaluation beside its checkpoint, as `zoo eval RUN` writes it.
    assert json.loads((moons_runs / "fm" / "eval_last_seed0.json").read_text())["rows"] == fm
    lines = [line for line in both.output.splitlines() if "│" in line]
    assert sum(" mf " in line for line in lines) == len(mf) and sum(" fm " in line for line in lines) == len(
        fm
    )
    # one line per run and family: mf's MeanFlow and Euler, fm's Euler
    drawn = [coloured_pixels(tmp_path / "both_quality.png", colour) for colour in LINE_COLOURS]
    assert all(count > 50 for count in drawn[:3]) and drawn[3] == 0, drawn


def test_runs_of_different_data_are_refused_before_anything_is_written(moons_runs, tmp_path):
    result = runner.invoke(
        app, ["eval", str(moons_runs / "mf"), str(moons_runs / "ck"), "--json", str(tmp_path / "j.json")]
    )
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert "evaluates checkerboard at n=200" in line and "compare runs of one dataset" in line
    assert not list(tmp_path.iterdir()) and not list((moons_runs / "ck").glob("eval_*"))


def test_run_listings_headline_fd_for_images_and_energy_otherwise():
    """`zoo ckpts`/`zoo status` show one number per run: FD of the one-step sampler when the
    evaluation has feature scores, energy distance when it has not."""
    from zoo.remote.listing import eval_json_metrics, key_metric

    fd = {"value": 12.5, "stderr": 0.4, "n": 1000}
    rows = [
        {"kind": "euler", "steps": 8, "energy_distance": 0.2, "scores": {"fd": {**fd, "value": 3.0}}},
        {"kind": "meanflow", "steps": 1, "energy_distance": 0.3, "scores": {"fd": fd}},
    ]
    assert key_metric(eval_json_metrics({"rows": rows})) == ("eval/fd_meanflow_1", 12.5)
    for row in rows:
        del row["scores"]
    assert key_metric(eval_json_metrics({"rows": rows})) == ("eval/energy_meanflow_1", 0.3)


def test_reports_read_back_as_written_and_from_before_feature_scores():
    from zoo.metrics.feature_metrics import Estimate

    fd = Estimate(12.5, 0.4, 1000)
    report = EvalReport(n_samples=1000, rows=[row("meanflow", 1, 1, 0.3)], features="net")
    report.rows[0].scores = {"fd": fd}
    report.rows[0].class_fidelity = Estimate(0.8, 0.01, 1000)
    report.rows[0].per_class_fd = {"shirt": fd}
    data = json.loads(json.dumps(report.to_dict()))
    assert EvalReport.from_dict(data) == report
    assert report.metrics()["eval/fd_meanflow_1"] == 12.5 and report.metrics()["eval/fd_meanflow_1_se"] == 0.4
    old = {
        "n_samples": 50,
        "rows": [
            {"method": "m", "kind": "euler", "steps": 2, "nfe": 2, "energy_distance": 0.1, "stderr": 0.01}
        ],
        "noise_floor": None,
    }
    assert EvalReport.from_dict(old).rows[0] == EvalRow("m", "euler", 2, 2, 0.1, 0.01)
