"""ImageNet as Stable-Diffusion VAE latents (4x32x32 for 256 px images), encoded once beforehand.

Layout under `data.root` (written by `scripts/encode_latents.py`):

    imagenet-latents/train_latents.npy   (N, 4, 32, 32) float16, already multiplied by 0.18215
    imagenet-latents/train_labels.npy    (N,) int64 class indices (ImageFolder order)
    imagenet-latents/val_latents.npy, val_labels.npy   the held-out split
    imagenet-latents/meta.json           classes, image size, VAE name, scale

Latents are not flipped (a flipped image's latent is not the flipped latent); `is_latent` tells
the evaluator to decode with the VAE before looking at or scoring samples.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from zoo.config.schema import DataConfig
from zoo.data.sources import ImageFiles, Split, TensorSource, limit_train
from zoo.errors import DataNotFoundError

LATENT_FOLDER = "imagenet-latents"
SD_VAE_SCALE = 0.18215


def latent_paths(folder: Path, split: str) -> tuple[Path, Path]:
    return folder / f"{split}_latents.npy", folder / f"{split}_labels.npy"


def _load_split(folder: Path, split: str, limit: int | None) -> Split:
    latents_path, labels_path = latent_paths(folder, split)
    for path in (latents_path, labels_path):
        if not path.is_file():
            raise DataNotFoundError(
                f"ImageNet latents not found: {path} is missing. Encode them once with "
                f"`python scripts/encode_latents.py --root {folder.parent} --split train` and "
                f"`... --split val` (needs {folder.parent}/imagenet/{{train,val}}/ and the SD-VAE "
                "weights), or copy an existing imagenet-latents folder there."
            )
    # Memory-mapped so that a small train_size reads only what it uses.
    latents = np.load(latents_path, mmap_mode="r")
    labels = np.load(labels_path)
    if len(latents) != len(labels):
        raise ValueError(
            f"{latents_path} has {len(latents)} latents but {labels_path} has {len(labels)} labels"
        )
    count = len(latents) if limit is None else min(limit, len(latents))
    # np.array copies (the memory map is read-only) and reads only the rows kept.
    return Split(torch.from_numpy(np.array(latents[:count])), torch.from_numpy(labels[:count]).long())


def build_imagenet_latents(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> TensorSource:
    folder = Path(cfg.root) / LATENT_FOLDER
    train = _load_split(folder, "train", cfg.train_size)
    test = _load_split(folder, "val", None)
    meta_path = folder / "meta.json"
    classes = (
        json.loads(meta_path.read_text())["classes"]
        if meta_path.is_file()
        else [str(k) for k in range(int(train.labels.max()) + 1)]
    )
    return TensorSource(
        "imagenet-latents",
        limit_train(train, cfg.train_size, "imagenet-latents"),
        test,
        max_value=None,
        batch_size=batch_size,
        device=device,
        on_device=cfg.on_device,
        hflip=False,
        num_classes=len(classes) if cfg.class_conditional else 0,
        class_names=classes if cfg.class_conditional else [],
        is_image=False,
        is_latent=True,
    )


def encode_images(
    encode: Callable[[Tensor], Tensor],
    dataset: ImageFiles,
    folder: Path,
    split: str,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    log: Callable[[str], None] = print,
) -> dict[str, float | int | str]:
    """Encode every image of `dataset` (uint8 files, in order) with `encode` (x in [-1, 1] ->
    scaled latents) into {split}_latents.npy / {split}_labels.npy under `folder`.

    Written to temporary files first and renamed at the end: an interrupted run leaves no
    half-written dataset behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    latents_path, labels_path = latent_paths(folder, split)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    temporary = latents_path.with_name(f"{latents_path.name}.tmp")
    out: np.memmap | None = None  # shape known after the first batch
    labels = np.empty(len(dataset), dtype=np.int64)
    start, done = time.perf_counter(), 0
    with torch.no_grad():
        for images, batch_labels in loader:
            x = images.to(device).float() / 127.5 - 1.0
            z = encode(x).to("cpu", torch.float16).numpy()
            if out is None:
                shape = (len(dataset), *z.shape[1:])
                out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float16, shape=shape)
            out[done : done + len(z)] = z
            labels[done : done + len(z)] = batch_labels.numpy()
            done += len(z)
            elapsed = time.perf_counter() - start
            log(f"{split}: {done}/{len(dataset)} images, {done / elapsed:.1f} images/s")
    if out is None:
        raise ValueError(f"no images to encode for split {split!r}")
    out.flush()
    del out
    np.save(labels_path, labels)
    temporary.replace(latents_path)  # last: the latents file appears only when complete
    seconds = time.perf_counter() - start
    return {"split": split, "images": done, "seconds": seconds, "latents": str(latents_path)}
