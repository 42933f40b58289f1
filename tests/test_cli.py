"""The `zoo` commands as a user runs them, through typer's CliRunner, on tiny real runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from zoo.checkpoints import load_checkpoint
from zoo_cli.main import app

runner = CliRunner()

# A 2-D MeanFlow run small enough for a test: tiny MLP, few steps, small evaluation.
TINY = [
    "model.hidden=64",
    "model.depth=2",
    "train.batch_size=64",
    "train.log_every=5",
    "train.save_every=10",
    "eval.n_samples=200",
    "eval.solver_nfe=[2,4]",
    "eval.batch_size=200",
    "--device",
    "cpu",
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def zoo(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def train(name: str, steps: int, *extra: str):
    return zoo("train", "moons", *TINY, "--steps", str(steps), "--run-name", name, *extra)


def test_train_writes_complete_run_folder(workdir, isolated_trackio):
    result = train("t1", 20)
    assert result.exit_code == 0, result.output
    run = workdir / "outputs" / "t1"
    for name in [
        "last.pt",
        "step_0000020.pt",
        "config.toml",
        "metrics.jsonl",
        "heartbeat.json",
        "eval.json",
        "samples/final.png",
    ]:
        assert (run / name).exists(), name
    assert "MeanFlow 1-step" in result.output and "data vs data" in result.output
    heartbeat = json.loads((run / "heartbeat.json").read_text())
    assert heartbeat["status"] == "finished" and heartbeat["step"] == 20
    payload = load_checkpoint(run / "last.pt")
    assert payload["step"] == 20 and payload["run_name"] == "t1"
    assert payload["config"]["model"]["hidden"] == 64
    log = (workdir / "EXPERIMENT_LOG.md").read_text()
    assert "run `t1`" in log and "zoo train moons" in log and "MeanFlow 1-step" in log
    evaluation = json.loads((run / "eval.json").read_text())
    kinds = {(r["kind"], r["steps"]) for r in evaluation["rows"]}
    assert {("meanflow", 1), ("meanflow", 2), ("meanflow", 4), ("euler", 2), ("heun", 1)} <= kinds
    # trackio reads the run back through its own CLI
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "trackio"),
            "get",
            "metric",
            "--project",
            "zoo",
            "--run",
            "t1",
            "--metric",
            "train/loss",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    values = json.loads(out.stdout)["values"]
    assert [v["step"] for v in values] == [5, 10, 15, 20]


def test_bad_config_fails_before_any_work(workdir):
    result = zoo("train", "moons", "loss.ratio=2", "model.widht=3", "--run-name", "bad")
    assert result.exit_code == 2
    assert "loss.ratio" in result.output and "model.widht" in result.output
    assert not (workdir / "outputs").exists()
    result = zoo("train", "moons", "--steps", "0")
    assert result.exit_code == 2 and "train.steps" in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["digits", "model.attention_res=[5]"], "attention_res"),
        (["moons", "loss.jvp=cuda_graph"], "cuda_graph"),
        (["moons", "train.cuda_graph=true"], "train.cuda_graph=false"),
        (["moons", "data.train_size=0"], "data.train_size"),
    ],
)
def test_config_problems_found_while_building_exit_2_and_write_nothing(workdir, args, fragment):
    result = zoo("train", *args, "--run-name", "b", "--device", "cpu", "--steps", "2")
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (workdir / "outputs" / "b").exists()


def test_missing_dataset_is_a_clear_error_and_writes_nothing(workdir):
    result = zoo("train", "cifar10", "data.root=nowhere", "--run-name", "c", "--device", "cpu")
    assert result.exit_code == 1
    assert "cifar-10-batches-py" in result.output and "download" in result.output
    assert not (workdir / "outputs" / "c").exists()


def test_run_name_collision_and_resume_rules(workdir):
    assert train("dup", 10).exit_code == 0
    result = train("dup", 10)
    assert result.exit_code == 2 and "already exists" in result.output
    result = zoo("train", "moons", "--resume")
    assert result.exit_code == 2 and "--run-name" in result.output
    result = zoo("train", "moons", "--resume", "--run-name", "never-ran")
    assert result.exit_code == 2 and "cannot resume" in result.output
    result = zoo("train", "moons", "--resume", "--run-name", "dup", "loss.ratio=0.1", "--steps", "20")
    assert result.exit_code == 2 and "loss.ratio" in result.output


def test_resume_reproduces_the_uninterrupted_loss_curve(workdir):
    assert train("straight", 30).exit_code == 0
    assert train("split", 10).exit_code == 0
    result = zoo("train", "moons", "--run-name", "split", "--resume", "--steps", "30")
    assert result.exit_code == 0, result.output

    def losses(name):
        records = [
            json.loads(line)
            for line in (workdir / "outputs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}

    straight, split = losses("straight"), losses("split")
    assert sorted(split) == sorted(straight) == [5, 10, 15, 20, 25, 30]
    for step in straight:
        assert split[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    a = load_checkpoint(workdir / "outputs" / "straight" / "last.pt")
    b = load_checkpoint(workdir / "outputs" / "split" / "last.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key])
    assert b["step"] == 30


def test_sample_and_eval_commands(workdir):
    assert train("s", 10).exit_code == 0
    ckpt = workdir / "outputs" / "s" / "last.pt"
    result = zoo("sample", ckpt, "--nfe", "2", "--n", "50", "--out", "two.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    samples = np.load(workdir / "two.npz")["samples"]
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    result = zoo(
        "sample", ckpt, "--nfe", "4", "--solver", "heun", "--n", "10", "--out", "heun.png", "--device", "cpu"
    )
    assert result.exit_code == 0 and (workdir / "heun.png").exists()
    result = zoo("sample", ckpt, "--nfe", "3", "--solver", "heun", "--out", "x.png")
    assert result.exit_code == 2 and "multiple" in result.output
    result = zoo("eval", ckpt, "--n", "100", "--json", "e.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((workdir / "e.json").read_text())
    assert data["n_samples"] == 100 and data["noise_floor"]["energy_distance"] < 0.1
    assert "Heun" in result.output


def test_corrupt_checkpoint_is_a_clear_error(workdir):
    (workdir / "broken.pt").write_bytes(b"not a checkpoint at all")
    result = zoo("sample", workdir / "broken.pt")
    assert (
        result.exit_code == 1
        and "broken.pt is not a checkpoint" in result.output
        and "\\n" not in result.output.strip()
    )
    # A damaged file fails (exit 1); a path with no file is the user's to change (exit 2).
    for command in ("sample", "eval"):
        result = zoo(command, workdir / "absent.pt")
        assert result.exit_code == 2 and "no checkpoint at" in result.output, result.output
        assert "Traceback" not in result.output
