"""Image datasets: where their files are, how they are split, and which source serves them.

Pixels map to [-1, 1].  Horizontal flips (`data.hflip`) apply to natural images (Fashion-MNIST,
CIFAR-10, CelebA, ImageNet), never to digits, whose mirror images are not digits.

Layout under `data.root` (the same on every machine: nothing is hard-coded elsewhere):

    FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (filled from the Debian package)
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}   (torchvision's CIFAR-10)
    celeba/img_align_celeba/*.jpg  [+ celeba/list_eval_partition.txt]
    imagenet/{train,val}/<class folder>/*.JPEG
"""

import contextlib
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from zoo.config.schema import DataConfig
from zoo.data.sources import CenterCropResize, ImageFiles, LoaderSource, Split, TensorSource, limit_train
from zoo.errors import DataNotFoundError, OutputPathError
from zoo.network import socket_timeout
from zoo.output_paths import check_writable_dir

# Where `apt-get install dataset-fashion-mnist` puts the real Fashion-MNIST IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def tv_datasets():
    """torchvision.datasets, imported on first use: importing torchvision takes seconds (it pulls in
    torch._dynamo), which every `zoo` command, even `--help`, would otherwise pay."""
    import torchvision.datasets

    return torchvision.datasets


CIFAR10_FILES = [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch", "batches.meta"]
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision's source
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DOWNLOAD_TIMEOUT_S = 60  # per connection attempt and read: a dead network fails instead of hanging
DATA_ROOT_OPTION = "data.root (--data-dir)"
DIGITS_HELD_OUT = 297
DIGITS_SPLIT_SEED = 0
CELEBA_CROP = 178
CELEBA_HELD_OUT_FRACTION = 0.1


def _classes(cfg: DataConfig, names: list[str]) -> tuple[int, list[str]]:
    return (len(names), names) if cfg.class_conditional else (0, [])


def _tensor_source(
    cfg: DataConfig,
    name: str,
    train: Split,
    test: Split,
    max_value: float,
    hflip: bool,
    class_names: list[str],
    device: torch.device,
    batch_size: int,
) -> TensorSource:
    native = train.data.shape[-1]
    if cfg.image_size not in (None, native):
        raise ValueError(
            f"data.image_size={cfg.image_size} cannot be used with {name} "
            f"(its images are {native}x{native}); resizing applies to celeba and imagenet only: "
            "leave data.image_size unset"
        )
    num_classes, names = _classes(cfg, class_names)
    return TensorSource(
        name,
        limit_train(train, cfg.train_size, name),
        test,
        max_value=max_value,
        batch_size=batch_size,
        device=device,
        on_device=cfg.on_device,
        hflip=hflip,
        num_classes=num_classes,
        class_names=names,
    )


# --- scikit-learn digits -------------------------------------------------------------------------


def build_digits(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> TensorSource:
    """The 1797 real 8x8 digits bundled with scikit-learn (values 0..16), one channel.

    A fixed random split (the same for every run): 1500 training, 297 held out.
    """
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only when needed

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_HELD_OUT], order[DIGITS_HELD_OUT:]
    return _tensor_source(
        cfg,
        "digits",
        Split(images[train], labels[train]),
        Split(images[test], labels[test]),
        max_value=16.0,
        hflip=False,
        class_names=[str(d) for d in range(10)],
        device=device,
        batch_size=batch_size,
    )


# --- Writing into data.root -----------------------------------------------------------------------


def check_data_root(folder: Path, why: str) -> None:
    """`folder` (under data.root) can be created and written, or an OutputPathError (exit 2)
    naming data.root and `why` zoo writes there, before anything is copied or downloaded."""
    try:
        check_writable_dir(folder, DATA_ROOT_OPTION)
    except OutputPathError as exc:
        raise OutputPathError(f"{why}: {exc}") from None


@contextlib.contextmanager
def staging_folder(root: Path) -> Iterator[Path]:
    """A hidden folder in `root` for a download, removed whatever happens: a failed or interrupted
    download leaves nothing half-written, and only whole, checked files are moved into place.
    A data.root this created is removed again if the download fails: the disk is as it was."""
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".zoo-download-", dir=root) as folder:
            yield Path(folder)
    except BaseException:
        for folder in created:  # deepest first; each is empty unless something else wrote there
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def move_files(source: Path, target: Path, names: list[str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(source / name, target / name)


def download_reason(exc: Exception) -> str:
    """The cause of a failed download, without urllib's "<urlopen error ...>" wrapping."""
    return str(exc.reason) if isinstance(exc, urllib.error.URLError) else str(exc)


def fetch_url(url: str, dest: Path, md5: str) -> None:
    """Stream `url` into `dest` and check its MD5; OSError (URLError is one) or ValueError on failure."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != md5:
        raise ValueError(f"the file's MD5 is {digest.hexdigest()}, expected {md5} (truncated or altered)")


# --- Fashion-MNIST ---------------------------------------------------------------------------------


def _write_atomically_from(source: BinaryIO, target: Path) -> None:
    temporary = target.with_name(f"{target.name}.tmp{os.getpid()}")
    with temporary.open("wb") as out:
        shutil.copyfileobj(source, out)
    temporary.replace(target)


def prepare_fashion_mnist(root: Path, download: bool) -> Path:
    """Make sure root/FashionMNIST/raw holds the four IDX files; return that folder.

    Search order: the folder itself, the Debian package (gunzipped into the folder), then a
    torchvision download when `download` is set.
    """
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in FASHION_MNIST_FILES):
        return raw
    packaged = [DEBIAN_FASHION_MNIST / f"{f}.gz" for f in FASHION_MNIST_FILES]
    if all(p.is_file() for p in packaged):
        check_data_root(raw, f"Fashion-MNIST is unpacked from {DEBIAN_FASHION_MNIST} into data.root")
        raw.mkdir(parents=True, exist_ok=True)
        for gz, name in zip(packaged, FASHION_MNIST_FILES, strict=True):
            with gzip.open(gz, "rb") as source:
                _write_atomically_from(source, raw / name)
        return raw
    if download:
        check_data_root(raw, "Fashion-MNIST is downloaded into data.root")
        with staging_folder(root) as staging:
            try:
                with socket_timeout(DOWNLOAD_TIMEOUT_S):  # torchvision's urlopen calls pass none
                    tv_datasets().FashionMNIST(str(staging), train=True, download=True)
            except (OSError, RuntimeError) as exc:  # torchvision: RuntimeError once every mirror failed
                raise DataNotFoundError(
                    f"could not download Fashion-MNIST ({download_reason(exc)}). Fix: `apt-get install "
                    f"dataset-fashion-mnist` (offline-friendly, real data), or put the files "
                    f"{', '.join(FASHION_MNIST_FILES)} (unzipped) into {raw}/ by hand."
                ) from None
            move_files(staging / "FashionMNIST" / "raw", raw, FASHION_MNIST_FILES)
        return raw
    raise DataNotFoundError(
        f"Fashion-MNIST not found: searched {raw} (files {', '.join(FASHION_MNIST_FILES)}) and "
        f"{DEBIAN_FASHION_MNIST} (the same files .gz). Fix: `apt-get install dataset-fashion-mnist` "
        "(offline-friendly, real data), or set data.download=true to let torchvision download it."
    )


def build_fashion_mnist(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> TensorSource:
    """Fashion-MNIST: 60k training / 10k test images, 28x28, one channel, 10 classes."""
    root = Path(cfg.root)
    prepare_fashion_mnist(root, cfg.download)
    splits = {}
    for train in (True, False):
        data = tv_datasets().FashionMNIST(str(root), train=train, download=False)
        splits[train] = Split(data.data.unsqueeze(1), data.targets.long())
    return _tensor_source(
        cfg,
        "fashion-mnist",
        splits[True],
        splits[False],
        max_value=255.0,
        hflip=cfg.hflip,
        class_names=FASHION_MNIST_CLASSES,
        device=device,
        batch_size=batch_size,
    )


# --- CIFAR-10 --------------------------------------------------------------------------------------


def build_cifar10(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> TensorSource:
    """CIFAR-10 through torchvision: 50k training / 10k test images, 3x32x32, 10 classes."""
    root = Path(cfg.root)
    folder = root / CIFAR10_FOLDER
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing and cfg.download:
        download_cifar10(root)
    elif missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. The files must be in "
            f"{folder}/ (torchvision's python version: data_batch_1..5, test_batch, batches.meta). "
            "Fix: `zoo train cifar10 data.download=true` to let torchvision download it, or copy an "
            f"existing cifar-10-batches-py folder into {root}/."
        )
    splits = {}
    classes: list[str] = []
    for train in (True, False):
        data = tv_datasets().CIFAR10(str(root), train=train, download=False)
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
        splits[train] = Split(images, torch.tensor(data.targets, dtype=torch.long))
        classes = list(data.classes)
    return _tensor_source(
        cfg,
        "cifar10",
        splits[True],
        splits[False],
        max_value=255.0,
        hflip=cfg.hflip,
        class_names=classes,
        device=device,
        batch_size=batch_size,
    )


def download_cifar10(root: Path) -> None:
    """Fetch torchvision's CIFAR-10 archive, check it and unpack it into root/cifar-10-batches-py."""
    folder = root / CIFAR10_FOLDER
    check_data_root(folder, "CIFAR-10 is downloaded into data.root")
    with staging_folder(root) as staging:
        archive = staging / "cifar-10-python.tar.gz"
        try:
            fetch_url(CIFAR10_URL, archive, CIFAR10_MD5)
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter="data")
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise DataNotFoundError(
                f"could not download CIFAR-10 from {CIFAR10_URL} ({download_reason(exc)}). Fix: download "
                f"cifar-10-python.tar.gz by hand and unpack it into {root}/ so that {folder}/ holds "
                "data_batch_1..5, test_batch and batches.meta (torchvision's python version)."
            ) from None
        move_files(staging / CIFAR10_FOLDER, folder, CIFAR10_FILES)


# --- CelebA and ImageNet (files, DataLoader workers) -----------------------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _celeba_split(folder: Path, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """The official partition when list_eval_partition.txt is there (train 0, test 2), else the
    last 10% of the sorted file names (CelebA's official test set is also its last files)."""
    partition_file = folder.parent / "list_eval_partition.txt"
    if partition_file.is_file():
        partition = dict(line.split() for line in partition_file.read_text().splitlines() if line.strip())
        train = [f for f in files if partition.get(f.name) == "0"]
        test = [f for f in files if partition.get(f.name) == "2"]
        return train, test
    cut = len(files) - max(1, int(len(files) * CELEBA_HELD_OUT_FRACTION))
    return files[:cut], files[cut:]


def build_celeba(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> LoaderSource:
    """CelebA aligned faces: centre crop 178x178, resize to data.image_size (default 64)."""
    if cfg.class_conditional:
        raise ValueError("CelebA has no class labels: set data.class_conditional=false")
    folder = Path(cfg.root) / "celeba" / "img_align_celeba"
    files = (
        sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    )
    if not files:
        raise DataNotFoundError(
            f"CelebA not found: no .jpg/.png images in {folder}. Download img_align_celeba.zip "
            f"(and optionally list_eval_partition.txt) from the CelebA site and unpack it so that "
            f"{folder}/000001.jpg exists; set data.root to the folder holding celeba/."
        )
    train, test = _celeba_split(folder, files)
    if cfg.train_size is not None:
        train = train[: cfg.train_size]
    size = cfg.image_size or 64
    transform = CenterCropResize(size, crop=CELEBA_CROP)
    return LoaderSource(
        "celeba",
        ImageFiles(train, [0] * len(train), transform),
        ImageFiles(test, [0] * len(test), transform),
        batch_size=batch_size,
        device=device,
        seed=seed,
        num_workers=cfg.num_workers,
        hflip=cfg.hflip,
        num_classes=0,
        class_names=[],
        image_size=size,
    )


def image_folder_files(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    found = tv_datasets().ImageFolder(str(folder))
    files = [Path(path) for path, _ in found.samples]
    return files, [label for _, label in found.samples], list(found.classes)


def build_imagenet(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> LoaderSource:
    """ImageNet as class folders: centre square crop, resize to data.image_size (default 256)."""
    root = Path(cfg.root) / "imagenet"
    train_dir, val_dir = root / "train", root / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise DataNotFoundError(
                f"ImageNet not found: {folder} is missing. Expected {train_dir}/<class>/*.JPEG and "
                f"{val_dir}/<class>/*.JPEG (one folder per class, the same class folders in both; "
                "sort the flat validation images into class folders first)."
            )
    train_files, train_labels, classes = image_folder_files(train_dir)
    val_files, val_labels, val_classes = image_folder_files(val_dir)
    if val_classes != classes:
        raise ValueError(
            f"{val_dir} has {len(val_classes)} class folders, {train_dir} has {len(classes)}: they must match"
        )
    if cfg.train_size is not None:
        # ImageFolder lists files class by class: take an evenly spread subset, not the first classes.
        step = max(1, len(train_files) // cfg.train_size)
        keep = list(range(0, len(train_files), step))[: cfg.train_size]
        train_files = [train_files[i] for i in keep]
        train_labels = [train_labels[i] for i in keep]
    size = cfg.image_size or 256
    transform = CenterCropResize(size)
    num_classes, names = _classes(cfg, classes)
    return LoaderSource(
        "imagenet",
        ImageFiles(train_files, train_labels, transform),
        ImageFiles(val_files, val_labels, transform),
        batch_size=batch_size,
        device=device,
        seed=seed,
        num_workers=cfg.num_workers,
        hflip=cfg.hflip,
        num_classes=num_classes,
        class_names=names,
        image_size=size,
    )
