"""`zoo train` and its run folder: refusals before any work, the finished run's files, resume checks."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo_cli.main import app

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train(name: str, steps: int, *extra: str):
    return runner.invoke(
        app, ["train", "moons", *TINY_RUN, "--steps", str(steps), "--run-name", name, *extra]
    )


def one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize(
    "output_dir, reason", [("/proc/zoo-runs", "/proc"), ("a-file", "is a file, not a folder")]
)
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(
    workdir, isolated_trackio, output_dir, reason
):
    (workdir / "a-file").write_text("not a folder\n")
    trackio_before = sorted(p.name for p in isolated_trackio.rglob("*"))
    result = train("x", 5, f"output_dir={output_dir}")
    text = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert (
        "error: cannot write into output_dir" in text
        and reason in text
        and "choose another output_dir" in text
    )
    assert (
        "Traceback" not in result.output and "run_name" not in result.output
    )  # before the config is printed
    assert "JVP" not in result.output  # nothing built, no training
    assert sorted(p.name for p in isolated_trackio.rglob("*")) == trackio_before  # no trackio run either
    assert (workdir / "a-file").read_text() == "not a folder\n"


def test_a_finished_run_folder_and_what_it_says(workdir):
    log = workdir / "notes" / "LOG.md"
    result = train("done", 20, f"experiment_log={log}")
    assert result.exit_code == 0, result.output
    run = workdir / "outputs" / "done"
    heartbeat = json.loads((run / "heartbeat.json").read_text())
    assert heartbeat["status"] == "finished" and heartbeat["phase"] == "done"
    # Where the run was logged, and how not to.
    assert "run `done`" in log.read_text()
    assert f"logged to {log}" in one_line(result.output) and "`experiment_log=` turns this off" in one_line(
        result.output
    )
    # The loss curve, with every logged step.
    with Image.open(run / "loss.png") as image:
        assert image.format == "PNG" and image.size[0] >= 400
    # A second run under the name is refused with a hint that really deletes it.
    result = train("done", 10)
    assert result.exit_code == 2
    assert "already exists" in result.output and "rm -r outputs/done" in one_line(result.output)
    assert "zoo clean" not in result.output


def test_digit_samples_are_saved_large_enough_to_see(workdir):
    result = runner.invoke(
        app,
        [
            "train",
            "digits",
            "--steps",
            "1",
            "--run-name",
            "dg",
            "train.batch_size=8",
            "model.channels=8",
            "model.channel_mults=[1]",
            "model.attention_res=[]",
            "tracking.enabled=false",
            "eval.n_samples=16",
            "eval.features=off",  # 16 samples: too few for the feature metrics
            "eval.batch_size=16",
            "eval.grid_size=16",
            "eval.meanflow_steps=[1]",
            'eval.solvers=["euler"]',
            "eval.solver_nfe=[1]",
            "loss.jvp=nograd",
            "experiment_log=",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(workdir / "outputs" / "dg" / "samples" / "final.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] >= 256
    # whole-pixel enlargement: columns come in identical groups
    factor = pixels.shape[1] // (4 * 10 + 2)
    assert factor >= 2 and (pixels[:, ::factor].repeat(factor, axis=1) == pixels).all()


def test_a_refused_resume_leaves_the_run_untouched(workdir):
    assert train("full", 20).exit_code == 0
    run = workdir / "outputs" / "full"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    result = runner.invoke(app, ["train", "moons", "--run-name", "full", "--resume", "--steps", "10"])
    assert result.exit_code == 2 and "already at step 20 of 10" in one_line(result.output)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()} == before


def test_a_copied_run_folder_names_the_run_its_checkpoint_belongs_to(workdir):
    assert train("orig", 10).exit_code == 0
    shutil.copytree(workdir / "outputs" / "orig", workdir / "outputs" / "copy")
    result = runner.invoke(app, ["train", "moons", "--run-name", "copy", "--resume", "--steps", "20"])
    text = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "outputs/copy/last.pt belongs to run 'orig', not 'copy'" in text
    assert "--run-name orig" in text and "changed: run_name" not in text
