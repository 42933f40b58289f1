"""Feature networks for the feature-space metrics: a small CNN classifier per image dataset, trained
by zoo itself (no download), deterministically, and cached with its config, the sha256 of its
weights and its test accuracy.

Its features are the penultimate layer (the global average of the last convolution stage, as
FID's pool3 is Inception's).  A net whose test accuracy falls below its dataset's floor is refused:
features of a poor classifier do not separate what a researcher cares about.

Inputs are images in the dataset's model space, as zoo's data sources produce them: (B, C, H, W)
in [-1, 1].  Training augments with random shifts (and horizontal flips where the dataset allows
them), draws all randomness from the config's seed and runs with deterministic algorithms, so
one config on one CPU machine gives the same weights (on CUDA, as far as its kernels allow).
"""

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.config.schema import DataConfig
from zoo.data import build_data
from zoo.data.base import BatchSource
from zoo.data.toy2d import TOY_DISTRIBUTIONS
from zoo.errors import MetricInputError
from zoo.output_paths import zoo_cache_dir
from zoo.runs import atomic_write_bytes, atomic_write_json

TEST_LIMIT = 100_000  # test images scored for the accuracy (all of them for zoo's datasets)
NO_LABELS = ("celeba",)  # image datasets without classes: no classifier to train
NOT_IMAGES = ("imagenet-latents",)


@dataclass(frozen=True)
class FeatureNetConfig:
    """Everything that determines a feature network: a cached net from another config is refused.

    widths: channels of the convolution stages (each `convs` conv-BN-ReLU, then a 2x2 max-pool
    except after the last); the features are a `hidden`-wide layer over the flattened last stage,
    or (hidden = 0) its global average, widths[-1] wide."""

    widths: tuple[int, ...] = (32, 64)
    convs: int = 1
    hidden: int = 128
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    dropout: float = 0.2
    shift: int = 2  # random translations of up to this many pixels
    hflip: bool = True
    train_size: int | None = None  # the first N training images; None: all
    seed: int = 0
    min_accuracy: float = 0.0  # the floor on test accuracy
    # Class-folder datasets: the sha256 of their class names, number of classes and image shape
    # (class_folders_id), so that another folder of the same name and size gets a net of its own.
    # "" for zoo's named datasets, whose classes are fixed.
    class_folders: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}


# The floors: Fashion-MNIST >= 92 %, digits >= 97 %, CIFAR-10 >= 90 %.
FEATURE_NET_CONFIGS: dict[str, FeatureNetConfig] = {
    "fashion-mnist": FeatureNetConfig(widths=(16, 32), epochs=10, shift=1, min_accuracy=0.92),
    "digits": FeatureNetConfig(epochs=30, batch_size=64, shift=1, hflip=False, min_accuracy=0.97),
    "cifar10": FeatureNetConfig(
        widths=(64, 128, 256, 512), convs=2, hidden=0, epochs=30, shift=4, min_accuracy=0.90
    ),
}


def class_folders_id(source: BatchSource) -> str:
    """The sha256 of a labelled source's class names, number of classes and image shape."""
    identity = {
        "classes": list(source.class_names),
        "num_classes": source.num_classes,
        "data_shape": list(source.data_shape),
    }
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def config_for(data: DataConfig) -> FeatureNetConfig:
    """The config of data.name's net; a class-folder dataset zoo has no tuned config for gets a
    four-stage net, a floor of five times chance (at most 50 %) and its classes' identity."""
    if data.name in FEATURE_NET_CONFIGS:
        return FEATURE_NET_CONFIGS[data.name]
    check_dataset(data.name)
    source = build_data(feature_data_config(data, FeatureNetConfig()), "cpu", 0, 1)
    return FeatureNetConfig(
        widths=(64, 128, 256, 256),
        convs=2,
        hidden=0,
        shift=4,
        min_accuracy=min(0.5, 5.0 / source.num_classes),
        class_folders=class_folders_id(source),
    )


class FeatureCNN(nn.Module):
    """Convolution stages, then the features: a hidden layer over the flattened last stage
    (config.hidden > 0; keeps where things are, which small images need) or the global average
    of the last stage; then a linear classifier."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int, config: FeatureNetConfig) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        layers: list[nn.Module] = []
        channels, size = data_shape[0], data_shape[-1]
        for stage, width in enumerate(config.widths):
            if stage:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            for _ in range(config.convs):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                channels = width
        self.body = nn.Sequential(*layers)
        if config.hidden:
            self.embed = nn.Sequential(
                nn.Flatten(), nn.Linear(channels * size * size, config.hidden), nn.ReLU()
            )
        else:
            self.embed = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden or channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(x)))


@dataclass
class FeatureNet:
    """A trained feature network and what it was trained on; `features`/`logits` take images in
    the dataset's model space ([-1, 1], (B, C, H, W)) and return float32 on the CPU.

    Samples are scored as the pictures they are: clipped to [-1, 1], as saving them clips them (and
    as FID's 8-bit images are).  Unclipped, a sample's out-of-range values would move its features
    although the picture shows nothing of them, and classifier-free guidance, which overshoots the
    range, would be scored for pixels no one sees."""

    dataset: str
    network: FeatureCNN
    config: FeatureNetConfig
    test_accuracy: float
    sha256: str
    train_seconds: float
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dim(self) -> int:
        return self.network.classifier.in_features

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.network.data_shape

    @torch.no_grad()
    def _batched(self, fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
        self.network.eval()
        outputs = [
            fn(images[i : i + batch_size].to(self.device, torch.float32).clamp(-1, 1)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(outputs) if outputs else torch.empty(0, self.dim)

    def features(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Penultimate-layer features (n, dim)."""
        return self._batched(self.network.features, images, batch_size)

    def logits(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Class logits (n, classes)."""
        return self._batched(self.network, images, batch_size)


# --- training ------------------------------------------------------------------------------------


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to `shift` pixels in each direction, edges replicated."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b, 1), generator=generator, device=generator.device)
    rows = (dy + torch.arange(h, device=dy.device)).to(x.device)  # (b, h)
    cols = (dx + torch.arange(w, device=dx.device)).to(x.device)  # (b, w)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def feature_data_config(data: DataConfig, config: FeatureNetConfig) -> DataConfig:
    """The data a feature net trains on: the dataset's full labelled training split (or the
    config's first train_size), whatever the generative run used."""
    return data.model_copy(
        update={
            "class_conditional": True,
            "hflip": config.hflip,
            "train_size": config.train_size,
            "download": False,
        }
    )


def check_dataset(name: str) -> None:
    if name in TOY_DISTRIBUTIONS:
        raise MetricInputError(
            f"{name} is 2-D data, not images: it has no feature network; score it by the energy distance"
        )
    if name in NO_LABELS:
        raise MetricInputError(
            f"{name} has no class labels, so zoo cannot train a feature network for it: feature metrics "
            "need a labelled image dataset (fashion-mnist, digits, cifar10, imagenet class folders)"
        )
    if name in NOT_IMAGES:
        raise MetricInputError(
            f"{name} are VAE latents, not images: feature metrics are computed on decoded images of the "
            "pixel dataset (imagenet)"
        )


@torch.no_grad()
def accuracy(network: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    network.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((network(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def weights_bytes(network: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in network.state_dict().items()}, buffer)
    return buffer.getvalue()


def fit(
    network: FeatureCNN,
    source: BatchSource,
    config: FeatureNetConfig,
    on_step: Callable[[int, int, float], None],
) -> None:
    """AdamW with a one-cycle learning rate over config.epochs epochs of `source`."""
    steps = config.epochs * -(-source.num_train // config.batch_size)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    generator = torch.Generator(source.device).manual_seed(config.seed)
    network.train()
    for step in range(steps):
        images, labels = source.next_batch(generator)
        loss = F.cross_entropy(network(random_shift(images, config.shift, generator)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        on_step(step + 1, steps, loss.item())


def train_feature_net(
    data: DataConfig,
    config: FeatureNetConfig,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> FeatureNet:
    """Train `data.name`'s feature network from `config`'s seed and score it on the test split.
    `on_step(step, steps, loss)` after each optimiser step.  Not cached and not checked against
    the floor here (`build_feature_net` does both)."""
    check_dataset(data.name)
    device = torch.device(device)
    source = build_data(feature_data_config(data, config), device, config.seed, config.batch_size)
    if not source.is_image or source.num_classes == 0:
        raise MetricInputError(f"{data.name} is not a labelled image dataset: it has no feature network")
    start = time.perf_counter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # initial weights and dropout
        # CUDA has no deterministic max-pool backward: there, warn instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        try:
            network = FeatureCNN(source.data_shape, source.num_classes, config).to(device)
            fit(network, source, config, on_step)
        finally:
            torch.use_deterministic_algorithms(deterministic)
    seconds = time.perf_counter() - start
    images, labels = source.held_out_labeled(TEST_LIMIT)
    network.eval()
    test_accuracy = accuracy(network, images, labels)
    digest = hashlib.sha256(weights_bytes(network)).hexdigest()
    return FeatureNet(data.name, network, config, test_accuracy, digest, seconds, device=device)


# --- the cache -----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$ZOO_CACHE_DIR/feature-nets (default ~/.cache/zoo/feature-nets)."""
    return zoo_cache_dir() / "feature-nets"


def cache_paths(data: DataConfig, config: FeatureNetConfig, cache_dir: Path) -> tuple[Path, Path]:
    """The weights (.pt) and the record (.json: config, sha256, accuracy) of data.name's net: named
    by the dataset, its image size and, for class folders, the identity of their classes."""
    stem = data.name if data.image_size is None else f"{data.name}-{data.image_size}px"
    if config.class_folders:
        stem += f"-{config.class_folders[:12]}"
    return cache_dir / f"{stem}.pt", cache_dir / f"{stem}.json"


def rebuild_hint(data: DataConfig) -> str:
    return f"rebuild it with `zoo features train {data.name} --data-dir {data.root}`"


def save_feature_net(net: FeatureNet, data: DataConfig, cache_dir: Path) -> None:
    """Weights first, then the record naming their hash: a cut-off save leaves no record, or one
    whose hash the weights do not match, never a record of other weights."""
    weights_path, record_path = cache_paths(data, net.config, cache_dir)
    atomic_write_bytes(weights_path, weights_bytes(net.network))
    record = {
        "dataset": net.dataset,
        "config": net.config.to_dict(),
        "sha256": net.sha256,
        "test_accuracy": net.test_accuracy,
        "train_seconds": net.train_seconds,
        "data_shape": list(net.data_shape),
        "num_classes": net.network.classifier.out_features,
    }
    atomic_write_json(record_path, record)
    net.path = weights_path


def check_floor(net: FeatureNet, data: DataConfig) -> None:
    if net.test_accuracy < net.config.min_accuracy:
        raise MetricInputError(
            f"the feature network for {data.name} reaches {net.test_accuracy:.2%} test accuracy, below its "
            f"floor of {net.config.min_accuracy:.0%}: its features are not trusted for metrics"
        )


def read_cached(data: DataConfig, config: FeatureNetConfig, cache_dir: Path) -> FeatureNet | None:
    """The cached net of `data` for `config`; None when there is none; a MetricInputError when
    the cache holds one that is damaged, from another config or below the floor."""
    weights_path, record_path = cache_paths(data, config, cache_dir)
    if not weights_path.exists() and not record_path.exists():
        return None

    def refuse(why: str) -> MetricInputError:
        return MetricInputError(f"the cached feature network {weights_path} {why}: {rebuild_hint(data)}")

    if not record_path.is_file() or not weights_path.is_file():
        raise refuse(f"is incomplete ({record_path.name} or {weights_path.name} missing)")
    try:
        record = json.loads(record_path.read_text())
        recorded = FeatureNetConfig(**{**record["config"], "widths": tuple(record["config"]["widths"])})
        digest, data_shape, num_classes = record["sha256"], tuple(record["data_shape"]), record["num_classes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise refuse(f"has an unreadable record {record_path.name} ({exc})") from None
    if recorded.class_folders != config.class_folders:
        raise refuse(
            "was trained on other class folders (other class names, number of classes or image shape)"
        )
    if recorded != config:
        changed = ", ".join(k for k, v in config.to_dict().items() if recorded.to_dict().get(k) != v)
        raise refuse(f"was trained with another config (differs in {changed})")
    payload = weights_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != digest:
        raise refuse("is damaged (its sha256 does not match the one recorded)")
    network = FeatureCNN(data_shape, num_classes, config)
    network.load_state_dict(torch.load(io.BytesIO(payload), weights_only=True))
    network.eval()
    net = FeatureNet(
        data.name, network, config, record["test_accuracy"], digest, record["train_seconds"], weights_path
    )
    check_floor(net, data)
    return net


def as_data_config(data: str | DataConfig) -> DataConfig:
    return data if isinstance(data, DataConfig) else DataConfig(name=data)


def build_feature_net(
    data: str | DataConfig,
    config: FeatureNetConfig | None = None,
    *,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> FeatureNet:
    """Train the net (replacing a cached one), refuse it below the floor (nothing is cached
    then) and cache it."""
    data = as_data_config(data)
    check_dataset(data.name)
    config = config or config_for(data)
    net = train_feature_net(data, config, device, on_step)
    check_floor(net, data)
    save_feature_net(net, data, cache_dir or default_cache_dir())
    return net


# Nets that take hours on a CPU: an evaluation never starts one there unasked.
ACCELERATOR_NETS = {"cifar10"}


def check_trainable_here(data: DataConfig, device: torch.device | str) -> None:
    if data.name in ACCELERATOR_NETS and torch.device(device).type == "cpu":
        raise MetricInputError(
            f"{data.name}'s feature network ({config_for(data).epochs} epochs of a four-stage CNN) would "
            f"train for hours on this CPU: build it on a GPU with `zoo features train {data.name} --device "
            f"cuda --data-dir {data.root}` (or copy its cache files into {default_cache_dir()})"
        )


def load_feature_net(
    data: str | DataConfig,
    config: FeatureNetConfig | None = None,
    *,
    train_if_missing: bool = True,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> FeatureNet:
    """The feature network of a dataset (a name, or the run's DataConfig: its root and image
    size are used), from the cache, or trained now when missing and `train_if_missing`
    (`on_step(step, steps, loss)` then reports the training).  Damaged or foreign cached files,
    nets below the floor and datasets without labels are MetricInputErrors."""
    data = as_data_config(data)
    check_dataset(data.name)
    cache_dir = cache_dir or default_cache_dir()
    config = config or config_for(data)
    net = read_cached(data, config, cache_dir)
    if net is None:
        if not train_if_missing:
            raise MetricInputError(
                f"no feature network for {data.name} in {cache_dir}: build it with `zoo features train "
                f"{data.name} --data-dir {data.root}`"
            )
        check_trainable_here(data, device)
        net = build_feature_net(data, config, cache_dir=cache_dir, device=device, on_step=on_step)
    net.network.to(device)
    net.device = torch.device(device)
    return net
