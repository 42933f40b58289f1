"""`zoo sample` / `zoo eval` with guidance chosen at sampling time, on a tiny iMF run whose model is
conditioned on guidance, and the one-line refusals of guidance a model cannot take."""

from pathlib import Path

import numpy as np
import pytest
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo_cli.main import app

runner = CliRunner()
IMF = [
    "loss.kind=imf",
    "loss.ratio=0.5",
    "loss.omega_max=4",
    "model.v_head=1",
    "model.guidance_inputs=true",
    "data.class_conditional=true",
]


def zoo(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """outputs/g: a 5-step class-conditional iMF run with guidance as a model input."""
    outputs = tmp_path_factory.mktemp("guidance") / "outputs"
    result = zoo(
        "train", "moons", *TINY_RUN, *IMF, f"output_dir={outputs}", "--steps", "5", "--run-name", "g"
    )
    assert result.exit_code == 0, result.output
    return outputs / "g"


def test_sample_takes_a_scale_and_an_interval(run, tmp_path):
    out = tmp_path / "s.png"
    result = zoo("sample", run, "--guidance", 3, "--guidance-interval", "0.2,0.8", "--n", 16, "--out", out)
    assert result.exit_code == 0, result.output
    assert "guidance 3 on [0.2, 0.8]" in " ".join(result.output.split())
    assert float(np.load(out.with_suffix(".npz"))["guidance"]) == 3.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guidance-interval", "0.8,0.2"], "0 <= a <= b <= 1"),
        (["--guidance-interval", "0.3"], "two times a,b"),
        (["--guidance", "0.5"], "trained on guidance scales in [1, 4]"),
        (["--guidance", "6"], "trained on guidance scales in [1, 4]"),
        # iMF trains intervals a,b with a <= 0.5 <= b: others would be extrapolation.
        (["--guidance-interval", "0.6,0.9"], "trained on guidance intervals a,b with a <= 0.5 <= b"),
        (["--guidance-interval", "0.1,0.4"], "trained on guidance intervals a,b with a <= 0.5 <= b"),
    ],
)
def test_bad_guidance_is_one_line_and_exit_2(run, tmp_path, args, message):
    result = zoo("sample", run, *args, "--out", tmp_path / "s.png")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "s.png").exists()


def test_an_interval_is_refused_for_a_model_without_guidance_inputs(tmp_path):
    outputs = tmp_path / "outputs"
    result = zoo("train", "moons", *TINY_RUN, f"output_dir={outputs}", "--steps", "2", "--run-name", "m")
    assert result.exit_code == 0, result.output
    result = zoo("sample", outputs / "m", "--guidance-interval", "0.2,0.8", "--out", tmp_path / "s.png")
    assert result.exit_code == 2
    assert "model.guidance_inputs" in " ".join(result.output.split())


def test_eval_takes_the_same_options(run, tmp_path):
    json_out = tmp_path / "e.json"
    result = zoo(
        "eval",
        run / "last.pt",
        "--guidance",
        2,
        "--guidance-interval",
        "0.1,0.9",
        "--json",
        json_out,
        "--n",
        64,
    )
    assert result.exit_code == 0, result.output
    assert json_out.exists()
    bad = zoo("eval", run / "last.pt", "--guidance", 0.5, "--json", tmp_path / "f.json")
    assert bad.exit_code == 2 and not (tmp_path / "f.json").exists()
    bad = zoo("eval", run / "last.pt", "--guidance-interval", "0.6,0.9", "--json", tmp_path / "g.json")
    assert bad.exit_code == 2 and not (tmp_path / "g.json").exists()
    assert "a <= 0.5 <= b" in " ".join(bad.output.split())


def eval_json(run: Path, path: Path, *args: object) -> dict:
    import json

    result = zoo("eval", run / "last.pt", *args, "--json", path, "--n", 64, "--threads", 1)
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text()) | {"output": " ".join(result.output.split())}


def test_eval_sweeps_guidance_on_one_interval_and_names_the_best(run, tmp_path):
    sweep = eval_json(
        run,
        tmp_path / "sweep.json",
        *["--guidance", 1, "--guidance", 2, "--guidance", 4],
        "--guidance-interval",
        "0.1,0.9",
    )
    rows = sweep["rows"]
    assert sorted({r["guidance"] for r in rows}) == [1.0, 2.0, 4.0]
    best = min(rows, key=lambda r: r["energy_distance"])
    assert sweep["best"]["metric"] == "energy_distance"
    assert (sweep["best"]["method"], sweep["best"]["guidance"]) == (best["method"], best["guidance"])
    assert f"best: {best['method']}" in sweep["output"] and "← best" in sweep["output"]
    for sampler, scale in sweep["best"]["guidance_by_sampler"].items():
        mine = [r for r in rows if f"{r['kind']}_{r['steps']}" == sampler]
        assert scale == min(mine, key=lambda r: r["energy_distance"])["guidance"]
    # Each row is the evaluation of its own scale on the swept interval: the same as asked alone,
    # and another interval gives other samples (0.2-1 holds both of Euler's two times, 1 and 0.5,
    # while 0.1-0.9 holds 0.5 only; the jumps take the interval as an input).
    alone = eval_json(run, tmp_path / "alone.json", "--guidance", 2, "--guidance-interval", "0.1,0.9")
    elsewhere = eval_json(run, tmp_path / "elsewhere.json", "--guidance", 2, "--guidance-interval", "0.2,1")

    def at_2(report: dict) -> dict:
        return {r["method"]: r["energy_distance"] for r in report["rows"] if r["guidance"] == 2.0}

    assert at_2(alone) == at_2(sweep)
    assert all(at_2(elsewhere)[m] != value for m, value in at_2(sweep).items())
