"""`zoo sample` as a user runs it on a tiny real run: output paths checked before any work, the
ODE's default NFE (the run's own), a run folder for its last.pt, --threads."""

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.config.schema import MAX_SAMPLES
from zoo_cli.main import app
from zoo_cli.sample import parse_classes

runner = CliRunner()


def zoo(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """outputs/s: a 10-step 2-D MeanFlow run (a few seconds), evaluated with the ODE at up to 42 NFE."""
    outputs = tmp_path_factory.mktemp("sample") / "outputs"
    args = ["--steps", "10", "--run-name", "s", "eval.solver_nfe=[2,42]"]
    result = zoo("train", "moons", *TINY_RUN, f"output_dir={outputs}", *args)
    assert result.exit_code == 0, result.output
    return outputs / "s"


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory) -> Path:
    """outputs/f: a 5-step class-conditional flow-matching run evaluated with heun at 6 NFE and
    guidance 2."""
    outputs = tmp_path_factory.mktemp("sample-fm") / "outputs"
    args = [
        "--steps",
        "5",
        "--run-name",
        "f",
        "loss.kind=flow_matching",
        "data.class_conditional=true",
        'eval.solvers=["heun"]',
        "eval.solver_nfe=[6]",
        "eval.guidance=2.0",
    ]
    result = zoo("train", "moons", *TINY_RUN, f"output_dir={outputs}", *args)
    assert result.exit_code == 0, result.output
    return outputs / "f"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_an_unwritable_out_is_refused_before_the_checkpoint_is_read(workdir, run):
    (workdir / "afile").write_text("x")
    (workdir / "broken.pt").write_bytes(b"not a checkpoint")  # reading it would fail differently
    result = zoo("sample", workdir / "broken.pt", "--out", "afile/x.png", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert flat(result.output).startswith("error: cannot write --out afile/x.png")
    assert "afile is a file, not a folder" in flat(result.output) and "Traceback" not in result.output
    result = zoo("sample", run / "last.pt", "--out", "/proc/zoo-x.png", "--device", "cpu")
    assert result.exit_code == 2 and "cannot write --out /proc/zoo-x.png" in flat(result.output)
    assert sorted(p.name for p in workdir.iterdir()) == ["afile", "broken.pt"]


def test_an_unwritable_samples_folder_beside_the_checkpoint_names_out(workdir, run):
    folder = workdir / "r"
    folder.mkdir()
    (folder / "last.pt").write_bytes((run / "last.pt").read_bytes())
    (folder / "samples").write_text("a file where the samples folder goes")
    result = zoo("sample", folder, "--device", "cpu")
    assert result.exit_code == 2 and "choose another --out" in flat(result.output)


@pytest.mark.parametrize("solver, nfe, steps", [("heun", 42, 21), ("rk4", 44, 11), ("euler", 42, 42)])
def test_a_solver_without_nfe_integrates_with_the_runs_largest_eval_nfe(workdir, run, solver, nfe, steps):
    """The NFE its training grids and `zoo eval` used, so the same run gives the same picture
    (rounded up to the solver's calls per step: rk4 makes 4)."""
    result = zoo(
        "sample", run / "last.pt", "--solver", solver, "--n", "8", "--out", "o.png", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert f"{steps} steps, {nfe} NFE" in flat(result.output)
    assert int(np.load(workdir / "o.npz")["nfe"]) == nfe


def test_an_explicit_nfe_still_wins_and_is_checked_before_loading(workdir, run):
    result = zoo(
        "sample",
        run / "last.pt",
        "--solver",
        "heun",
        "--nfe",
        "4",
        "--n",
        "8",
        "--out",
        "o.png",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0 and "2 steps, 4 NFE" in flat(result.output)
    result = zoo("sample", workdir / "absent.pt", "--solver", "heun", "--nfe", "3")
    assert result.exit_code == 2 and "multiple of 2; got 3" in flat(result.output)


def test_a_run_folder_samples_its_last_checkpoint(run):
    result = zoo("sample", run, "--n", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = run / "samples" / "last_meanflow_1nfe.npz"
    data = np.load(written)
    assert data["samples"].shape == (8, 2) and int(data["step"]) == 10


def test_threads_sets_torchs_cpu_threads(workdir, run):
    before = torch.get_num_threads()
    try:
        result = zoo(
            "sample", run / "last.pt", "--n", "8", "--out", "t.png", "--device", "cpu", "--threads", "2"
        )
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "--threads" in zoo("sample", "--help").output


def test_a_flow_matching_run_is_sampled_as_its_evaluation_sampled_it(workdir, fm_run):
    """No --solver, --nfe or --guidance: the run's eval.solvers[0] at its largest eval.solver_nfe,
    with its eval.guidance, as its training grids and `zoo eval` use them."""
    result = zoo("sample", fm_run, "--n", "16", "--out", "run.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "3 steps, 6 NFE, guidance 2" in flat(result.output)
    default = np.load(workdir / "run.npz")
    assert (int(default["nfe"]), float(default["guidance"])) == (6, 2.0)
    given = ["--solver", "heun", "--nfe", "6", "--n", "16", "--device", "cpu"]
    for guidance, out in (("2", "g2.png"), ("1", "g1.png")):
        assert zoo("sample", fm_run, *given, "--guidance", guidance, "--out", out).exit_code == 0
    np.testing.assert_array_equal(default["samples"], np.load(workdir / "g2.npz")["samples"])
    assert not np.allclose(default["samples"], np.load(workdir / "g1.npz")["samples"])


def test_an_nfe_the_runs_solver_cannot_take_names_where_the_solver_came_from(workdir, fm_run):
    result = zoo("sample", fm_run, "--nfe", "3", "--n", "8", "--out", "x.png", "--device", "cpu")
    assert result.exit_code == 2 and "multiple of 2; got 3" in flat(result.output)
    assert "the run's eval.solvers[0] is heun; pass --solver euler for any NFE" in flat(result.output)
    assert not (workdir / "x.png").exists()


def test_solver_meanflow_is_the_jump_sampler_and_refused_for_flow_matching(workdir, run, fm_run):
    result = zoo(
        "sample", run, "--solver", "meanflow", "--nfe", "2", "--n", "8", "--out", "m.png", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert int(np.load(workdir / "m.npz")["nfe"]) == 2
    result = zoo("sample", fm_run, "--solver", "meanflow", "--n", "8", "--out", "f.png", "--device", "cpu")
    assert result.exit_code == 2 and "need a MeanFlow model" in flat(result.output)
    assert not (workdir / "f.png").exists()


def test_latent_options_are_refused_for_a_pixel_model(workdir, run):
    for option in (["--latents"], ["--vae", "vae/sd-vae-ft-ema"]):
        result = zoo("sample", run, *option, "--out", "p.png", "--device", "cpu")
        assert result.exit_code == 2 and f"{option[0]} given, but this model generates pixels" in flat(
            result.output
        )
    assert not (workdir / "p.png").exists()


def test_a_huge_class_range_is_refused_before_it_is_expanded(run):
    """Ranges are counted before they are built (two billion classes would exhaust memory): more
    classes than the samples zoo sample may draw is one line, exit 2."""
    for text in (f"0-{MAX_SAMPLES}", "0-2000000000", f"0-{MAX_SAMPLES - 1},5"):
        result = zoo("sample", run, "--classes", text)
        assert result.exit_code == 2, result.output
        assert f"names more than {MAX_SAMPLES} classes" in flat(result.output)
    assert len(parse_classes(f"0-{MAX_SAMPLES - 1}")) == MAX_SAMPLES
