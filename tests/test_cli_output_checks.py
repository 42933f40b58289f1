"""Output files named on the command line are checked before the work that fills them:
`zoo bench-jvp --json` and `zoo ckpts download --dest` refuse an unwritable path at once."""

import pytest
from test_remote_fixtures import write_run
from typer.testing import CliRunner

from zoo.bench import jvp_bench
from zoo_cli.main import app

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    return tmp_path


def never_run(*args, **kwargs):
    raise AssertionError("the benchmark ran although its --json cannot be written")


@pytest.mark.parametrize("json_path", ["/proc/zoo-b.json", "afile/b.json"])
def test_bench_json_is_checked_before_the_benchmark(workdir, monkeypatch, json_path):
    monkeypatch.setattr(jvp_bench, "run_bench", never_run)
    result = runner.invoke(
        app,
        [
            "bench-jvp",
            "--device",
            "cpu",
            "--model",
            "moons",
            "--ratios",
            "0.5",
            "--repeats",
            "1",
            "--json",
            json_path,
        ],
    )
    assert result.exit_code == 2, result.output
    assert flat(result.output).startswith(f"error: cannot write --json {json_path}")
    assert "Traceback" not in result.output and (workdir / "afile").read_text() == "x"


@pytest.mark.parametrize("dest", ["/proc/zoo-x.pt", "afile/x.pt"])
def test_download_dest_is_checked_before_the_transfer(workdir, dest):
    write_run(workdir / "volume" / "outputs", "far", archived=[], last_step=10)
    result = runner.invoke(app, ["ckpts", "download", "far", "--volume-dir", "volume", "--dest", dest])
    assert result.exit_code == 2, result.output
    assert flat(result.output).startswith(f"error: cannot write --dest {dest}")
    assert not any(p.name.startswith(".") for p in workdir.rglob("*"))  # no partial download anywhere


def test_download_into_an_outputs_that_is_a_file_names_the_fix(workdir):
    write_run(workdir / "volume" / "outputs", "far", archived=[], last_step=10)
    result = runner.invoke(app, ["ckpts", "download", "far", "--volume-dir", "volume", "--outputs", "afile"])
    assert result.exit_code == 2 and "choose another --dest" in flat(result.output)
