"""Feature networks on real data (scikit-learn digits, Fashion-MNIST from the Debian package):
deterministic training, the cache and its refusals, the accuracy floor, `zoo features train`, and
features that rank real Fashion-MNIST above corrupted copies."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from zoo.config.schema import DataConfig
from zoo.data import images as image_data
from zoo.errors import MetricInputError
from zoo.metrics import features
from zoo.metrics.feature_metrics import score_features
from zoo.metrics.features import (
    FEATURE_NET_CONFIGS,
    FeatureNetConfig,
    build_feature_net,
    cache_paths,
    load_feature_net,
    random_shift,
    train_feature_net,
)
from zoo_cli.main import app

# Small enough to train in a few seconds on one core; its floor is far below the real one (97 %).
TINY = FeatureNetConfig(
    widths=(8, 16), hidden=32, epochs=3, batch_size=32, lr=1e-2, dropout=0.0, hflip=False, min_accuracy=0.8
)
DIGITS = DataConfig(name="digits")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("feature-nets")
    build_feature_net(DIGITS, TINY, cache_dir=cache)
    return cache


def test_floors_are_the_documented_ones():
    floors = {name: config.min_accuracy for name, config in FEATURE_NET_CONFIGS.items()}
    assert floors == {"fashion-mnist": 0.92, "digits": 0.97, "cifar10": 0.90}


def test_random_shift_crops_each_image_from_its_padded_copy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 6, 5, generator=g)
    shifted = random_shift(x, 2, g)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(shifted[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert matches, f"image {i} is no crop of its padded copy"
        offsets.add(matches[0])
    assert len(offsets) > 4  # the shifts differ between images


def test_training_is_deterministic_and_the_accuracy_is_the_nets(digits_cache):
    net = load_feature_net(DIGITS, TINY, cache_dir=digits_cache, train_if_missing=False)
    again = train_feature_net(DIGITS, TINY)
    assert again.sha256 == net.sha256
    source = image_data.build_digits(DIGITS.model_copy(update={"class_conditional": True}), "cpu", 0, 1)
    images, labels = source.held_out_labeled(10_000)
    assert len(images) == 297 and images.min() >= -1 and images.max() <= 1
    measured = float((net.logits(images).argmax(1) == labels).double().mean())
    assert measured == pytest.approx(net.test_accuracy) and net.test_accuracy >= TINY.min_accuracy
    assert net.features(images).shape == (297, 32) and net.dim == 32


def test_a_cached_net_is_loaded_not_retrained(digits_cache):
    steps = []
    net = load_feature_net(DIGITS, TINY, cache_dir=digits_cache, on_step=lambda *a: steps.append(a))
    record = json.loads(cache_paths(DIGITS, TINY, digits_cache)[1].read_text())
    assert steps == [] and net.sha256 == record["sha256"] and record["config"]["epochs"] == TINY.epochs


def copy_cache(source: Path, target: Path) -> Path:
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_damaged_incomplete_or_foreign_caches_are_refused(digits_cache, tmp_path):
    cache = copy_cache(digits_cache, tmp_path)
    weights, record = cache_paths(DIGITS, TINY, cache)
    payload = bytearray(weights.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    weights.write_bytes(bytes(payload))
    with pytest.raises(
        MetricInputError, match=r"damaged .*sha256.*rebuild it with `zoo features train digits"
    ):
        load_feature_net(DIGITS, TINY, cache_dir=cache)

    copy_cache(digits_cache, cache)
    with pytest.raises(MetricInputError, match=r"another config \(differs in epochs\)"):
        load_feature_net(
            DIGITS, FeatureNetConfig(**{**TINY.to_dict(), "widths": (8, 16), "epochs": 5}), cache_dir=cache
        )

    record.write_text(record.read_text()[:40])
    with pytest.raises(MetricInputError, match="unreadable record"):
        load_feature_net(DIGITS, TINY, cache_dir=cache)

    record.unlink()
    with pytest.raises(MetricInputError, match="incomplete"):
        load_feature_net(DIGITS, TINY, cache_dir=cache)

    weights.unlink()
    with pytest.raises(MetricInputError, match="no feature network for digits .*zoo features train digits"):
        load_feature_net(DIGITS, TINY, cache_dir=cache, train_if_missing=False)


def class_folders(root: Path, classes: list[str]) -> DataConfig:
    """An `imagenet` class-folder dataset under root: two 20x20 images per class and split."""
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            for i in range(2):
                path = root / "imagenet" / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20), (40 * k, 10 * i, 0)).save(path)
    return DataConfig(name="imagenet", root=str(root), image_size=16)


def test_class_folders_of_one_name_and_size_but_other_classes_get_their_own_net(tmp_path):
    """Two `imagenet` folders at 16 px, both with two classes, named differently: two cache files,
    and one folder's net (copied to the other's name) is refused for the other."""
    first = class_folders(tmp_path / "a", ["n01", "n02"])
    second = class_folders(tmp_path / "b", ["n01", "n03"])
    same_classes = class_folders(tmp_path / "c", ["n01", "n02"])
    configs = [features.config_for(data) for data in (first, second, same_classes)]
    cache = tmp_path / "cache"
    paths = [
        cache_paths(data, config, cache)
        for data, config in zip((first, second, same_classes), configs, strict=True)
    ]
    assert configs[0].class_folders != configs[1].class_folders
    assert paths[0] != paths[1] and paths[0][0].name.startswith("imagenet-16px-")
    assert paths[0] == paths[2]  # the key is the classes, not where the folder lies

    network = features.FeatureCNN((3, 16, 16), 2, configs[0])
    digest = hashlib.sha256(features.weights_bytes(network)).hexdigest()
    features.save_feature_net(
        features.FeatureNet("imagenet", network, configs[0], 1.0, digest, 0.0), first, cache
    )
    assert load_feature_net(first, configs[0], cache_dir=cache, train_if_missing=False).sha256 == digest
    for source, target in zip(paths[0], paths[1], strict=True):
        target.write_bytes(source.read_bytes())
    with pytest.raises(MetricInputError, match="was trained on other class folders"):
        load_feature_net(second, configs[1], cache_dir=cache, train_if_missing=False)


def test_a_net_below_its_floor_is_refused_and_not_cached(tmp_path):
    strict = FeatureNetConfig(**{**TINY.to_dict(), "widths": (8, 16), "epochs": 1, "min_accuracy": 0.999})
    with pytest.raises(MetricInputError, match=r"reaches \d+\.\d+% test accuracy, below its floor of 100%"):
        load_feature_net(DIGITS, strict, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "why"), [("celeba", "no class labels"), ("moons", "2-D data")])
def test_datasets_without_a_feature_net_are_refused(name, why, tmp_path):
    with pytest.raises(MetricInputError, match=why):
        load_feature_net(name, cache_dir=tmp_path)


runner = CliRunner()


def test_features_train_command_builds_the_cache_and_reports_accuracy(monkeypatch, tmp_path):
    monkeypatch.setitem(FEATURE_NET_CONFIGS, "digits", TINY)
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    result = runner.invoke(app, ["features", "train", "digits", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "floor 80%" in result.output
    assert (tmp_path / "feature-nets" / "digits.pt").is_file()
    (tmp_path / "feature-nets" / "digits.json").write_text("{")
    monkeypatch.setattr(features, "build_feature_net", lambda *a, **k: pytest.fail("should not train"))
    for args in (["features", "train", "moons"], ["features", "train", "nonsense"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output


needs_debian_fashion = pytest.mark.skipif(
    not image_data.DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{image_data.DEBIAN_FASHION_MNIST} missing: `apt-get install dataset-fashion-mnist`",
)


@pytest.mark.slow  # ~8 s of CPU: trains a small net on 3000 real images, the only real-image check
@needs_debian_fashion
def test_fashion_mnist_features_rank_real_images_above_noisy_ones(tmp_path):
    """A small net (3000 training images, 2 epochs) already tells real test images from noisy
    ones: FD and KID against real training images rise with the noise, precision falls."""
    data = DataConfig(name="fashion-mnist", root=str(tmp_path / "data"))
    small = FeatureNetConfig(widths=(8, 16), hidden=32, epochs=2, train_size=3000, min_accuracy=0.7)
    net = load_feature_net(data, small, cache_dir=tmp_path / "cache")
    source = image_data.build_fashion_mnist(data, "cpu", 0, 1)
    real, test = net.features(source.reference(1000)), source.held_out(1000)
    g = torch.Generator().manual_seed(0)
    scores = [
        score_features(real, net.features((test + s * torch.randn(test.shape, generator=g)).clamp(-1, 1)))
        for s in (0.0, 0.4)
    ]
    assert scores[1]["fd"].value > scores[0]["fd"].value + 5 * scores[1]["fd"].stderr
    assert scores[1]["kid"].value > scores[0]["kid"].value + 5 * scores[1]["kid"].stderr
    assert scores[1]["precision"].value < scores[0]["precision"].value - 5 * scores[1]["precision"].stderr


def test_an_evaluation_never_starts_cifar10s_net_on_a_cpu(tmp_path, monkeypatch):
    """Hours of CPU training must be asked for, not started by `zoo eval`: refused before any
    data is read or any step is taken, naming the GPU command."""

    def no_training(*args, **kwargs):
        raise AssertionError("the CIFAR-10 net started training on the CPU")

    monkeypatch.setattr(features, "build_feature_net", no_training)
    with pytest.raises(MetricInputError, match="zoo features train cifar10 --device cuda"):
        features.load_feature_net("cifar10", cache_dir=tmp_path, device="cpu")


def test_samples_are_scored_as_the_pictures_they_show(digits_cache):
    """Values beyond [-1, 1] are not in the picture: pushing black pixels further below -1 and
    white ones above 1 changes neither features nor logits, while a visible change does."""
    net = load_feature_net(DIGITS, TINY, cache_dir=digits_cache)
    images = torch.rand((64, *net.data_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    images[:, :, :2] = -1.0
    images[:, :, -2:] = 1.0
    beyond = images.clone()
    beyond[:, :, :2] = -3.0
    beyond[:, :, -2:] = 2.5
    assert torch.equal(net.features(beyond), net.features(images))
    assert torch.equal(net.logits(beyond), net.logits(images))
    visible = images.clone()
    visible[:, :, :2] = 0.0
    assert not torch.allclose(net.features(visible), net.features(images))
