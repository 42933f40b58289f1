"""Images as VAE latents (4x32x32 for 256 px images with the SD-VAE), encoded once beforehand.

Layout of a latents folder (`data.root/data.latent_folder`, written by `zoo data encode-latents`,
see zoo.data.encode):

    train_latents.npy   (N, 4, 32, 32) float16, already multiplied by the VAE's scale (0.18215)
    train_labels.npy    (N,) int64 class indices (sorted class folder names; 0 for a flat folder)
    val_latents.npy, val_labels.npy   the held-out split
    meta.json           classes, image size, latent shape, the VAE's name and scale
    {split}_encode.json how each split was encoded (source, flips, posterior, seed, time)

Latents are not flipped during training (a flipped image's latent is not the flipped latent;
encode flipped copies instead).  The source records which VAE made the latents and, unless
`data.decode_latents=false`, loads it at once (the same instance for every later picture), so a
run without the VAE's weights stops before training, not at its first sample grid.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zoo.config.loading import ConfigError
from zoo.config.schema import DataConfig
from zoo.data.sources import Split, TensorSource, limit_train
from zoo.errors import DataNotFoundError
from zoo.models.vae import DEFAULT_SD_VAE, SDVAE, decode_latents, load_vae

SD_VAE_SCALE = 0.18215
META_KEYS = ("classes", "image_size", "vae", "scale")


def is_latent_data(cfg: DataConfig) -> bool:
    """Whether a run with this data config generates latents (to decode before looking at them)."""
    return cfg.name == "imagenet-latents"


def latent_paths(folder: Path, split: str) -> tuple[Path, Path]:
    return folder / f"{split}_latents.npy", folder / f"{split}_labels.npy"


def latent_folder(cfg: DataConfig) -> Path:
    return Path(cfg.root) / cfg.latent_folder


def encode_hint(folder: Path) -> str:
    return (
        f"encode them once with `zoo data encode-latents {folder.parent}/imagenet --split train --out "
        f"{folder}` and the same with `--split val` (see docs/latents.md), or copy an encoded folder there"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a latents folder, checked for what decoding needs: the VAE's name and scale."""
    path = folder / "meta.json"
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing: it records which VAE made the latents; {encode_hint(folder)}"
        )
    meta = json.loads(path.read_text())
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise DataNotFoundError(f"{path} lacks {', '.join(missing)}; {encode_hint(folder)}")
    if not float(meta["scale"]) > 0:
        raise DataNotFoundError(f"{path} records the VAE scale {meta['scale']}; it must be positive")
    return meta


def _load_split(folder: Path, split: str, limit: int | None, meta: dict[str, Any]) -> Split:
    latents_path, labels_path = latent_paths(folder, split)
    for path in (latents_path, labels_path):
        if not path.is_file():
            raise DataNotFoundError(f"latents not found: {path} is missing; {encode_hint(folder)}")
    summary_path = folder / f"{split}_encode.json"
    if summary_path.is_file():  # written by zoo's encoder: the split must come from meta.json's VAE
        summary = json.loads(summary_path.read_text())
        if (summary["vae"], float(summary["scale"])) != (meta["vae"], float(meta["scale"])):
            raise DataNotFoundError(
                f"{summary_path} says {split} was encoded by {summary['vae']!r} (scale {summary['scale']}), "
                f"but meta.json records {meta['vae']!r} (scale {meta['scale']}): the splits of one folder "
                "must come from one VAE; encode them again"
            )
    # Memory-mapped so that a small train_size reads only what it uses.
    latents = np.load(latents_path, mmap_mode="r")
    labels = np.load(labels_path)
    if len(latents) != len(labels):
        raise ValueError(
            f"{latents_path} has {len(latents)} latents but {labels_path} has {len(labels)} labels"
        )
    if "latent_shape" in meta and list(latents.shape[1:]) != list(meta["latent_shape"]):
        raise DataNotFoundError(
            f"{latents_path} holds latents of shape {list(latents.shape[1:])}, meta.json says "
            f"{meta['latent_shape']}; encode the folder again"
        )
    count = len(latents) if limit is None else min(limit, len(latents))
    # np.array copies (the memory map is read-only) and reads only the rows kept.
    return Split(torch.from_numpy(np.array(latents[:count])), torch.from_numpy(labels[:count]).long())


class LatentSource(TensorSource):
    """Latents held as one tensor, with the VAE that maps them back to images.

    `vae_name`/`vae_scale` are what meta.json records; `vae` is the loaded decoder (None when
    data.decode_latents=false: pictures then show latent channels)."""

    def __init__(self, *args, vae_name: str, vae_scale: float, vae: SDVAE | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vae_name = vae_name
        self.vae_scale = vae_scale
        self.vae = vae

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] on the CPU."""
        if self.vae is None:
            raise ValueError("this source was built with data.decode_latents=false: it has no VAE to decode")
        return decode_latents(self.vae, latents)


def latent_vae_name(cfg: DataConfig, override: str | None = None) -> tuple[str, float]:
    """(where to load the VAE from, the scale the latents were multiplied by) for decoding.

    `override` (a command's --vae), else data.vae, else the VAE recorded in the latents folder's
    meta.json, else the default SD-VAE; the scale is the recorded one (SD's 0.18215 when the
    folder is not on this machine)."""
    folder = latent_folder(cfg)
    meta = read_meta(folder) if (folder / "meta.json").is_file() else None
    name = override or cfg.vae or (meta["vae"] if meta else DEFAULT_SD_VAE)
    return name, float(meta["scale"]) if meta else SD_VAE_SCALE


def load_decoder(name: str, scale: float, device: torch.device | str) -> SDVAE:
    """The VAE `name` on `device` (once per process), checked to decode latents of `scale`."""
    vae = load_vae(name, device)
    if not np.isclose(vae.scale, scale, rtol=1e-6):
        raise ConfigError(
            f"the VAE {name!r} scales latents by {vae.scale}, but these latents were scaled by {scale}: "
            "decode them with the VAE that encoded them (meta.json's vae; data.vae or --vae to point at it)"
        )
    return vae


def build_imagenet_latents(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> LatentSource:
    folder = latent_folder(cfg)
    if not folder.is_dir():
        raise DataNotFoundError(f"latents not found: {folder} does not exist; {encode_hint(folder)}")
    meta = read_meta(folder)
    train = _load_split(folder, "train", cfg.train_size, meta)
    test = _load_split(folder, "val", None, meta)
    classes = list(meta["classes"])
    if cfg.class_conditional and not classes:
        raise ConfigError(
            f"{folder} holds latents of a folder without classes: set data.class_conditional=false"
        )
    vae_name, scale = latent_vae_name(cfg)
    vae = load_decoder(vae_name, scale, device) if cfg.decode_latents else None
    return LatentSource(
        cfg.name,
        limit_train(train, cfg.train_size, cfg.latent_folder),
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
        vae_name=vae_name,
        vae_scale=scale,
        vae=vae,
    )
