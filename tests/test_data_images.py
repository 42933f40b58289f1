"""Image datasets: real digits and Fashion-MNIST, clear errors for missing files, file folders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.config.schema import DataConfig
from zoo.data import DataNotFoundError, build_data
from zoo.data import images as image_data


def build(batch_size: int = 64, **cfg):
    return build_data(DataConfig(**cfg), "cpu", seed=0, batch_size=batch_size)


def rows(x: torch.Tensor) -> set[bytes]:
    """Each sample as bytes, to compare sets of images exactly."""
    return {r.numpy().astype(np.float32).tobytes() for r in x.reshape(len(x), -1)}


# --- digits --------------------------------------------------------------------------------------


def test_digits_real_data_split_and_range():
    from sklearn.datasets import load_digits

    s = build(name="digits", class_conditional=True, hflip=True)
    assert (s.data_shape, s.num_train, s.num_classes, s.is_image) == ((1, 8, 8), 1500, 10, True)
    held_x, held_y = s.held_out_labeled(10_000)
    train_x = s.reference(10_000)
    assert held_x.shape == (297, 1, 8, 8) and train_x.shape == (1500, 1, 8, 8)
    # Values 0..16 map to [-1, 1] in steps of 1/8.
    assert held_x.min() == -1 and train_x.max() == 1
    assert torch.equal(train_x * 8, (train_x * 8).round())
    # Together the two splits are exactly sklearn's 1797 (distinct) digits; none is in both.
    real = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 8 - 1
    assert rows(held_x) | rows(train_x) == rows(real)
    assert not rows(held_x) & rows(train_x)
    assert torch.bincount(held_y, minlength=10).min() > 15  # a random split covers every class


def test_digits_are_never_flipped():
    s = build(name="digits", hflip=True, batch_size=500)
    train = rows(s.reference(1500))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = s.next_batch(g)
        assert rows(x) <= train
        assert y is None


def test_train_size_limits_the_training_set():
    s = build(name="digits", train_size=100)
    assert s.num_train == 100 and s.reference(1000).shape[0] == 100
    with pytest.raises(ValueError, match="train_size"):
        build(name="digits", train_size=5000)


def test_image_size_only_where_images_are_resized():
    assert build(name="digits", image_size=8).data_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="celeba and imagenet"):
        build(name="digits", image_size=16)


# --- Fashion-MNIST ---------------------------------------------------------------------------------

needs_debian_fashion = pytest.mark.skipif(
    not image_data.DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{image_data.DEBIAN_FASHION_MNIST} missing: "
    "`apt-get install dataset-fashion-mnist` for the real-data test",
)


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    if image_data.DEBIAN_FASHION_MNIST.is_dir():
        image_data.prepare_fashion_mnist(root, download=False)
    return root


@needs_debian_fashion
def test_fashion_mnist_real_data_from_the_debian_package(fashion_root):
    assert all((fashion_root / "FashionMNIST" / "raw" / f).is_file() for f in image_data.FASHION_MNIST_FILES)
    s = build(name="fashion-mnist", root=str(fashion_root), class_conditional=True)
    assert (s.data_shape, s.num_train, s.num_classes) == ((1, 28, 28), 60_000, 10)
    train = s.reference(60_000)
    held, labels = s.held_out_labeled(20_000)
    assert held.shape == (10_000, 1, 28, 28)
    assert train.min() == -1 and train.max() == 1
    # The published statistics of Fashion-MNIST's training pixels in [0, 1]: mean 0.2860, std 0.3530.
    pixels01 = (train + 1) / 2
    assert pixels01.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert pixels01.std().item() == pytest.approx(0.3530, abs=5e-4)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10  # the balanced test set
    assert s.class_names[9] == "Ankle boot"


@needs_debian_fashion
def test_fashion_mnist_flips(fashion_root):
    s = build(name="fashion-mnist", root=str(fashion_root), train_size=64, batch_size=64, hflip=True)
    train = s.reference(64)
    originals, mirrored = rows(train), rows(train.flip(-1))
    x, _ = s.next_batch(torch.Generator().manual_seed(0))
    kinds = [(r in originals, r in mirrored) for r in rows(x)]
    assert all(a or b for a, b in kinds)
    assert any(a and not b for a, b in kinds) and any(b and not a for a, b in kinds)


def test_fashion_mnist_missing_names_paths_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", tmp_path / "no-package")
    with pytest.raises(DataNotFoundError) as error:
        build(name="fashion-mnist", root=str(tmp_path / "data"))
    message = str(error.value)
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    assert str(tmp_path / "no-package") in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message


# --- CIFAR-10 --------------------------------------------------------------------------------------


def test_cifar10_missing_gives_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        build(name="cifar10", root=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data.download=true" in message and "data_batch_1" in message
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing downloaded


# --- CelebA and ImageNet folders -----------------------------------------------------------------


def solid(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def test_celeba_folder_crop_resize_and_partition(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    for i in range(1, 9):
        solid(folder / f"{i:06d}.png", (178, 218), 20 * i)
    partition = "".join(f"{i:06d}.png {0 if i <= 5 else (1 if i == 6 else 2)}\n" for i in range(1, 9))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(partition)
    s = build(name="celeba", root=str(tmp_path), image_size=16, batch_size=3)
    assert (s.data_shape, s.num_train, s.num_classes, s.hflip) == ((3, 16, 16), 5, 0, True)
    x, y = s.next_batch(torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 16, 16) and y is None
    values = sorted(((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist())
    assert set(values) <= {20, 40, 60, 80, 100}
    held = ((s.held_out(10) + 1) * 127.5).round()
    assert sorted(held[:, 0, 0, 0].tolist()) == [140.0, 160.0]  # partition 2 only
    assert torch.equal(held, held[:, :1, :1, :1].expand_as(held))  # solid colours survive exactly


def test_celeba_without_partition_holds_out_the_last_files(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    for i in range(1, 21):
        solid(folder / f"{i:06d}.jpg", (178, 218), 10 * i)
    s = build(name="celeba", root=str(tmp_path), image_size=8)
    assert s.num_train == 18 and len(s.test) == 2


def test_celeba_missing_and_unconditional_only(tmp_path):
    with pytest.raises(DataNotFoundError, match="img_align_celeba"):
        build(name="celeba", root=str(tmp_path))
    with pytest.raises(ValueError, match="class_conditional"):
        build(name="celeba", root=str(tmp_path), class_conditional=True)


def test_imagenet_folders_with_classes(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for k, wnid in enumerate(["n01", "n02"]):
            for i in range(count):
                solid(tmp_path / "imagenet" / split / wnid / f"{i}.JPEG", (40 + 10 * i, 30), 100 * k + 10 * i)
    s = build(name="imagenet", root=str(tmp_path), image_size=16, class_conditional=True, batch_size=6)
    assert (s.data_shape, s.num_train, s.num_classes, s.class_names) == ((3, 16, 16), 6, 2, ["n01", "n02"])
    x, y = s.next_batch(torch.Generator().manual_seed(0))
    value = ((x[:, 0, 8, 8] + 1) * 127.5).round().long()
    assert torch.equal(value // 100, y)  # labels follow the class folders
    held, held_y = s.held_out_labeled(100)
    assert held.shape == (4, 3, 16, 16) and sorted(held_y.tolist()) == [0, 0, 1, 1]


def test_imagenet_missing_val_is_explained(tmp_path):
    solid(tmp_path / "imagenet" / "train" / "n01" / "0.JPEG", (32, 32), 0)
    with pytest.raises(DataNotFoundError, match="val"):
        build(name="imagenet", root=str(tmp_path))


@needs_debian_fashion
def test_evaluation_scores_flip_trained_models_against_flipped_real_images(fashion_root):
    """A model trained with flips learns the half-mirrored mixture: its references must be that
    mixture, the same every evaluation, and untouched where training did not flip."""
    from zoo.evaluation import HELD_OUT_FLIP_SEED, as_trained

    flipped = build(name="fashion-mnist", root=str(fashion_root), hflip=True)
    held_out = flipped.held_out(1000)
    served = as_trained(flipped, held_out, HELD_OUT_FLIP_SEED)
    mirrored = (served == held_out.flip(-1)).flatten(1).all(1) & (served != held_out).flatten(1).any(1)
    assert ((served == held_out).flatten(1).all(1) | mirrored).all()  # each image kept or mirrored
    assert 440 <= int(mirrored.sum()) <= 560  # Binomial(1000, 1/2): 3.8 sd either side
    assert torch.equal(served, as_trained(flipped, held_out, HELD_OUT_FLIP_SEED))

    plain = build(name="fashion-mnist", root=str(fashion_root), hflip=False)
    assert torch.equal(as_trained(plain, plain.held_out(100), HELD_OUT_FLIP_SEED), plain.held_out(100))
