"""`zoo ckpts download RUN[/STEP]`: verified by size, sha256 sidecar and loading; nothing half-written."""

import hashlib
import os
from pathlib import Path

import pytest
import typer
from test_remote_fixtures import write_run
from typer.testing import CliRunner

from zoo.checkpoints import load_checkpoint, save_checkpoint
from zoo.remote.download import DownloadError, download_checkpoint, parse_checkpoint_spec
from zoo.remote.store import LocalDirStore, StoreEntry
from zoo_cli.main import app as zoo_app

runner = CliRunner()


def cli() -> typer.Typer:
    """The real `zoo` app, as installed."""
    return zoo_app


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("run", ("run", "last.pt")),
        ("run/last", ("run", "last.pt")),
        ("run/2000", ("run", "step_0002000.pt")),
        ("run/step_0002000.pt", ("run", "step_0002000.pt")),
    ],
)
def test_checkpoint_specs(spec, expected):
    assert parse_checkpoint_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "/100", "run/best", "run/step_12.pt"])
def test_bad_checkpoint_specs(spec):
    with pytest.raises(ValueError):
        parse_checkpoint_spec(spec)


@pytest.fixture
def volume(tmp_path) -> Path:
    root = tmp_path / "volume"
    write_run(root / "outputs", "far", archived=[10, 20], last_step=20)
    return root


def test_download_via_cli_verifies_and_is_repeatable(volume, tmp_path):
    outputs = tmp_path / "outputs"
    result = runner.invoke(
        cli(), ["ckpts", "download", "far/10", "--volume-dir", str(volume), "--outputs", str(outputs)]
    )
    assert result.exit_code == 0, result.output
    got = outputs / "far@remote" / "step_0000010.pt"
    source = volume / "outputs" / "far" / "step_0000010.pt"
    assert got.read_bytes() == source.read_bytes()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert (got.parent / "step_0000010.pt.sha256").read_text().split()[0] == digest
    assert "step 10" in result.output and "verified" in result.output
    again = runner.invoke(
        cli(), ["ckpts", "download", "far", "--volume-dir", str(volume), "--outputs", str(outputs)]
    )
    assert again.exit_code == 0 and load_checkpoint(outputs / "far@remote" / "last.pt")["step"] == 20
    assert sorted(p.name for p in got.parent.iterdir()) == [
        "last.pt",
        "last.pt.sha256",
        "step_0000010.pt",
        "step_0000010.pt.sha256",
    ]


def test_a_missing_checkpoint_names_what_exists(volume, tmp_path):
    result = runner.invoke(
        cli(), ["ckpts", "download", "far/30", "--volume-dir", str(volume), "--outputs", str(tmp_path)]
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "no checkpoint step_0000030.pt" in text and "step_0000010.pt" in text


class TruncatingStore(LocalDirStore):
    """A store whose transfers lose the tail of the file (a dropped connection)."""

    def download(self, path, dest, on_bytes=None):
        full = super().download(path, dest, on_bytes)
        dest.write_bytes(dest.read_bytes()[: full // 2])
        return full // 2


def test_a_short_transfer_is_rejected_and_leaves_nothing(volume, tmp_path):
    dest = tmp_path / "got" / "last.pt"
    with pytest.raises(DownloadError, match="received"):
        download_checkpoint(TruncatingStore(volume), "outputs/far", "last.pt", "far", dest)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_a_sidecar_hash_mismatch_is_rejected(volume, tmp_path):
    (volume / "outputs" / "far" / "last.pt.sha256").write_text("0" * 64 + "  last.pt\n")
    dest = tmp_path / "got" / "last.pt"
    with pytest.raises(DownloadError, match="sha256"):
        download_checkpoint(LocalDirStore(volume), "outputs/far", "last.pt", "far", dest)
    assert list(dest.parent.iterdir()) == []


def test_a_file_that_is_not_a_checkpoint_of_this_run_is_rejected(volume, tmp_path):
    save_checkpoint(
        volume / "outputs" / "far" / "step_0000010.pt", {"run_name": "other", "step": 10, "model": {}}
    )
    with pytest.raises(DownloadError, match="belongs to run 'other'"):
        download_checkpoint(LocalDirStore(volume), "outputs/far", "step_0000010.pt", "far", tmp_path / "x.pt")
    garbage = volume / "outputs" / "far" / "step_0000020.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    # The run's own save wrote a sha256 beside the real step 20, after it: the garbage no longer
    # matches it.  Written later than that sidecar, the garbage is judged by loading it.
    with pytest.raises(DownloadError, match="does not load.*is not a checkpoint"):
        download_checkpoint(LocalDirStore(volume), "outputs/far", "step_0000020.pt", "far", tmp_path / "y.pt")
    sidecar = garbage.with_name(f"{garbage.name}.sha256")
    os.utime(sidecar, (garbage.stat().st_mtime + 10,) * 2)
    with pytest.raises(DownloadError, match="differs from the recorded"):
        download_checkpoint(LocalDirStore(volume), "outputs/far", "step_0000020.pt", "far", tmp_path / "y.pt")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


class ReplacedOnceStore(LocalDirStore):
    """last.pt is replaced by a newer checkpoint while the first transfer runs (a live run saving)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.transfers = 0

    def download(self, path, dest, on_bytes=None):
        received = super().download(path, dest, on_bytes)
        self.transfers += 1
        if self.transfers == 1:
            save_checkpoint(self.root / path, {"run_name": "far", "step": 21, "model": {}, "pad": "x" * 100})
        return received


def test_a_checkpoint_replaced_during_download_is_fetched_again(volume, tmp_path):
    store = ReplacedOnceStore(volume)
    restarts = []
    result = download_checkpoint(
        store, "outputs/far", "last.pt", "far", tmp_path / "last.pt", on_restart=lambda: restarts.append(1)
    )
    assert store.transfers == 2 and restarts == [1]
    assert result.step == 21 and load_checkpoint(tmp_path / "last.pt")["step"] == 21


def test_store_entries_report_sizes(volume):
    entry = LocalDirStore(volume).stat("outputs/far/last.pt")
    assert (
        isinstance(entry, StoreEntry)
        and entry.size == (volume / "outputs" / "far" / "last.pt").stat().st_size
    )
