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
