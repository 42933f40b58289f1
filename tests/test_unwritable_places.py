"""Places a command writes to only at its end (the experiment log) or to save work for later (the
cache) are checked before the work: an unwritable one the user named is one line and exit 2; an
unwritable default cache means no cache, with a notice, never a failure."""

from pathlib import Path

import numpy as np
import pytest
from latent_helpers import TinyFeatures
from PIL import Image
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.errors import OutputPathError
from zoo.metrics.inception import default_stats_cache, folder_reference
from zoo.output_paths import zoo_cache_dir
from zoo_cli.main import app

runner = CliRunner()
UNWRITABLE = "/proc/zoo-unwritable"  # not even root can create files under /proc


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_unwritable_experiment_log_is_refused_before_training(workdir):
    log = f"{UNWRITABLE}/EXPERIMENT_LOG.md"
    args = [a for a in TINY_RUN if not a.startswith("experiment_log=")]
    result = runner.invoke(
        app, ["train", "moons", *args, f"experiment_log={log}", "--steps", "2", "--run-name", "e"]
    )
    assert result.exit_code == 2, result.output
    assert (
        result.output.startswith(f"error: cannot write experiment_log {log}")
        and result.output.count("\n") == 1
    )
    assert not any(workdir.iterdir())  # no run folder: refused before training


def test_unwritable_cache_dir_named_by_the_user_is_an_error(monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", UNWRITABLE)
    with pytest.raises(OutputPathError, match=r"cannot write into \$ZOO_CACHE_DIR /proc/zoo-unwritable"):
        zoo_cache_dir()


def test_unwritable_home_means_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", UNWRITABLE)
    assert zoo_cache_dir() is None and default_stats_cache() is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_stats_cache() == tmp_path / ".cache" / "zoo" / "fid-stats"
    assert not (tmp_path / ".cache").exists()  # checked, not created


def test_folder_statistics_without_a_cache_are_computed_and_not_written(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    before = sorted(tmp_path.rglob("*"))
    starts: list[bool] = []
    uncached = folder_reference(folder, TinyFeatures(), 16, None, on_start=lambda n, c: starts.append(c))
    assert sorted(tmp_path.rglob("*")) == before and starts == [False]
    cached = folder_reference(folder, TinyFeatures(), 16, tmp_path / "cache")
    np.testing.assert_allclose(uncached.mu, cached.mu)
    np.testing.assert_allclose(uncached.sigma, cached.sigma)
    assert len(list(Path(tmp_path / "cache").iterdir())) == 1
