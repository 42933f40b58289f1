"""Preparing data.root: an unwritable folder or a failed download is a one-line error naming the
fix, and leaves nothing half-written. No test reaches the network: the download URL is a closed
local port or a file:// archive built here."""

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import pytest
from test_remote_fixtures import closed_port
from typer.testing import CliRunner

from zoo.config.schema import DataConfig
from zoo.data import DataNotFoundError, build_data
from zoo.data import images as image_data
from zoo.errors import OutputPathError
from zoo_cli.main import app

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


def closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz"  # refused: nothing listens there


def fake_cifar_archive(path: Path) -> str:
    """A tar.gz with cifar-10-batches-py/ and its seven (tiny, not real) files; returns its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        for name in image_data.CIFAR10_FILES:
            data = pickle.dumps({"name": name})
            info = tarfile.TarInfo(f"{image_data.CIFAR10_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_an_unreachable_server_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(image_data, "CIFAR10_URL", closed_port_url())
    root = tmp_path / "data" / "sub"  # created for the download, so removed again after it failed
    with pytest.raises(DataNotFoundError) as error:
        build_data(DataConfig(name="cifar10", root=str(root), download=True), "cpu", seed=0, batch_size=8)
    message = str(error.value)
    assert message.startswith("could not download CIFAR-10 from http://127.0.0.1:")
    assert "Connection refused" in message and "<urlopen error" not in message
    assert f"{root / 'cifar-10-batches-py'}/ holds data_batch_1..5" in message
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_archive_is_refused_and_existing_files_stay(tmp_path, monkeypatch):
    archive = tmp_path / "cifar.tar.gz"
    fake_cifar_archive(archive)
    monkeypatch.setattr(image_data, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(image_data, "CIFAR10_MD5", "0" * 32)
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"kept")
    with pytest.raises(DataNotFoundError, match="MD5"):
        image_data.download_cifar10(root)
    assert [p.name for p in root.rglob("*")] == ["cifar-10-batches-py", "data_batch_1"]
    assert (root / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"kept"


def test_a_checked_archive_is_unpacked_into_place(tmp_path, monkeypatch):
    archive = tmp_path / "cifar.tar.gz"
    monkeypatch.setattr(image_data, "CIFAR10_MD5", fake_cifar_archive(archive))
    monkeypatch.setattr(image_data, "CIFAR10_URL", archive.as_uri())
    root = tmp_path / "data"
    image_data.download_cifar10(root)
    folder = root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no staging folder left
    assert sorted(p.name for p in folder.iterdir()) == sorted(image_data.CIFAR10_FILES)
    assert pickle.loads((folder / "test_batch").read_bytes()) == {"name": "test_batch"}


def test_zoo_train_with_a_failed_download_exits_1_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(image_data, "CIFAR10_URL", closed_port_url())
    (tmp_path / "dl").mkdir()
    result = runner.invoke(
        app,
        [
            "train",
            "cifar10",
            "--data-dir",
            "dl",
            "--steps",
            "2",
            "data.download=true",
            "--run-name",
            "c",
            "--device",
            "cpu",
            "experiment_log=",
        ],
    )
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "could not download CIFAR-10" in error[0] and "Traceback" not in result.output
    assert list((tmp_path / "dl").iterdir()) == [] and not (tmp_path / "outputs").exists()


def test_an_unwritable_data_root_for_the_debian_fashion_mnist_names_data_root(tmp_path, monkeypatch):
    package = tmp_path / "package"
    package.mkdir()
    for name in image_data.FASHION_MNIST_FILES:
        (package / f"{name}.gz").write_bytes(b"")
    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", package)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError) as error:
        image_data.prepare_fashion_mnist(tmp_path / "afile" / "data", download=False)
    message = str(error.value)
    assert message.startswith(
        f"Fashion-MNIST is unpacked from {package} into data.root: cannot write into data.root"
    )
    assert "choose another data.root (--data-dir)" in message
    assert (tmp_path / "afile").read_text() == "x"


def test_zoo_train_with_an_unwritable_data_dir_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    package = tmp_path / "package"
    package.mkdir()
    for name in image_data.FASHION_MNIST_FILES:
        (package / f"{name}.gz").write_bytes(b"")
    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", package)
    result = runner.invoke(
        app,
        [
            "train",
            "fashion-mnist",
            "--data-dir",
            "/proc/x",
            "--steps",
            "2",
            "--run-name",
            "f",
            "--device",
            "cpu",
            "experiment_log=",
        ],
    )
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: Fashion-MNIST is unpacked from")
    assert "data.root (--data-dir) /proc/x/FashionMNIST/raw" in error[0] and "Traceback" not in result.output
    assert not (tmp_path / "outputs").exists()


def test_a_failed_fashion_mnist_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", tmp_path / "no-package")
    monkeypatch.setattr(
        image_data.tv_datasets().FashionMNIST, "mirrors", [closed_port_url().rsplit("/", 1)[0] + "/"]
    )
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as error:
        image_data.prepare_fashion_mnist(root, download=True)
    assert str(error.value).startswith("could not download Fashion-MNIST")
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert list(root.iterdir()) == []
