"""Encode an image folder into VAE latents, in shards that survive an interruption.

The images are a split of class folders (ImageNet's `train/<class>/*.JPEG`) or one flat folder
(CelebA's `img_align_celeba/*.jpg`, no labels).  Each is centre-cropped to a square, resized to
`image_size` and encoded by the VAE (a sample of its posterior, or its mean).  With
`flip_copies`, every image is encoded a second time mirrored: latents cannot be flipped during
training (a mirrored image's latent is not the mirrored latent), so augmentation by flips has to
happen here.  The items are the images in listing order, then (with flips) their mirror images.

Work is cut into shards of `shard_size` items, each written to its own file as soon as it is
done, under a hidden folder next to the output.  A run that is interrupted (Ctrl-C, a killed or
preempted container) leaves its finished shards behind; the same command encodes only the
missing ones.  The posterior noise of a shard comes from a generator seeded by (seed, shard):
the assembled file does not depend on where a run was interrupted: on one machine and with the
same batch size it is byte for byte the file an uninterrupted run writes (another batch size or
device can change the rounding of the convolutions, so the last bits of some float16 values).
The settings that define the result are kept with the shards (plan.json); resuming with others
is refused.

The output folder (see zoo.data.latents) gets {split}_latents.npy (float16), {split}_labels.npy,
{split}_encode.json (what was encoded, how, how long) and meta.json (classes, image size, the
VAE's name and scale: what decoding and the loader check).
"""

import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zoo.config.loading import ConfigError
from zoo.data.images import IMAGE_SUFFIXES, image_folder_files
from zoo.data.latents import latent_paths, read_meta
from zoo.data.sources import CenterCropResize, ImageFiles
from zoo.errors import DataNotFoundError, OutputPathError
from zoo.models.vae import DEFAULT_SD_VAE, SDVAE, load_vae
from zoo.output_paths import check_writable_dir
from zoo.runs import atomic_write_bytes, atomic_write_json

PLAN_FILE = "plan.json"
Posterior = Literal["sample", "mean"]


@dataclass(frozen=True)
class ImageList:
    """The files of one split, their labels and the class names (empty for a flat folder)."""

    folder: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]

    def fingerprint(self) -> str:
        """A hash of the relative file names and labels: a resumed encoding must see the same images."""
        digest = hashlib.sha256()
        for path, label in zip(self.files, self.labels, strict=True):
            digest.update(f"{path.relative_to(self.folder)}\t{label}\n".encode())
        return digest.hexdigest()


def split_folder(dataset: Path, split: str) -> Path:
    """`dataset/split` when it exists (ImageNet's train/ and val/), else `dataset` itself."""
    return dataset / split if (dataset / split).is_dir() else dataset


def list_images(folder: Path, limit: int | None = None) -> ImageList:
    """Class folders (one subfolder per class, sorted names -> labels 0..K-1, as torchvision's
    ImageFolder and zoo's imagenet loader) or a flat folder of .jpg/.jpeg/.png files (no labels).
    `limit` keeps an evenly spread subset (every class represented, not the first few)."""
    if not folder.is_dir():
        raise DataNotFoundError(f"no image folder {folder}: give a folder of class folders or of images")
    entries = sorted(folder.iterdir())
    subfolders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if subfolders and images:
        raise DataNotFoundError(
            f"{folder} holds both images and subfolders; give either class folders "
            "(<folder>/<class>/*.jpg) or a flat folder of images"
        )
    if subfolders:
        try:
            files, labels, classes = image_folder_files(folder)
        except FileNotFoundError as exc:  # torchvision: a class folder without images
            raise DataNotFoundError(f"{folder}: {exc}") from None
    elif images:
        files, labels, classes = images, [0] * len(images), []
    else:
        raise DataNotFoundError(f"no images (.jpg, .jpeg, .png) or class folders in {folder}")
    if limit is not None and limit < len(files):
        keep = np.linspace(0, len(files) - 1, limit).round().astype(int)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return ImageList(folder, files, labels, classes)


@dataclass(frozen=True)
class EncodeSettings:
    """What defines the encoded latents (recorded with the shards; a resumed run must match)."""

    image_size: int = 256
    crop: int | None = None  # centre square of this side before resizing; None = the shorter side
    vae: str = DEFAULT_SD_VAE
    flip_copies: bool = False
    posterior: Posterior = "sample"
    seed: int = 0
    shard_size: int = 1024

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 4096:
            raise ValueError(f"--image-size must lie in 8..4096, got {self.image_size}")
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"--crop must be at least 1, got {self.crop}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"--posterior must be sample or mean, got {self.posterior!r}")


class FlipCopies(Dataset):
    """Items 0..N-1 are the images, N..2N-1 (with `flip`) the same images mirrored left-right."""

    def __init__(self, images: ImageFiles, flip: bool) -> None:
        self.images = images
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images) * (2 if self.flip else 1)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.images[index % len(self.images)]
        return (image.flip(-1) if index >= len(self.images) else image), label


def shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, shard]).generate_state(1, dtype=np.uint64)[0] >> 1)


def no_op(*args: object) -> None:
    """The default callback: nobody to tell."""


class LatentEncoding:
    """One split's encoding into `out`; construct it, `check()` (before loading the VAE), `run(vae)`."""

    def __init__(self, images: ImageList, out: Path, split: str, settings: EncodeSettings) -> None:
        self.images = images
        self.out = out
        self.split = split
        self.settings = settings
        self.shard_dir = out / f".{split}-shards"
        self.latents_path, self.labels_path = latent_paths(out, split)
        self.num_items = len(images.files) * (2 if settings.flip_copies else 1)
        self.num_shards = -(-self.num_items // settings.shard_size)

    def plan(self) -> dict:
        return {
            "split": self.split,
            "source": str(self.images.folder.resolve()),
            "images": len(self.images.files),
            "items": self.num_items,
            "fingerprint": self.images.fingerprint(),
            "classes": self.images.classes,
            **asdict(self.settings),
        }

    def check(self) -> None:
        """Refuse, before any work, what would overwrite or mix up latents: an encoded split,
        shards of an encoding with other settings, a meta.json of another VAE or image size."""
        check_writable_dir(self.out, "--out")
        if self.latents_path.exists():  # written last: the split is complete
            raise OutputPathError(
                f"{self.latents_path} exists: {self.split} is encoded already; delete "
                f"{self.latents_path.name} and {self.labels_path.name} in {self.out} to encode it again"
            )
        plan_path = self.shard_dir / PLAN_FILE
        if plan_path.is_file():
            previous = json.loads(plan_path.read_text())
            differing = sorted(k for k, v in self.plan().items() if previous.get(k) != v)
            if differing:
                named = ("the file list" if k == "fingerprint" else k for k in differing)
                raise ConfigError(
                    f"{self.shard_dir} holds an interrupted encoding of {self.split} that differs in "
                    f"{', '.join(named)}: resume it with the settings and images it began with, or delete "
                    "that folder to start over"
                )
        meta = read_meta(self.out) if (self.out / "meta.json").is_file() else None
        if meta is not None:
            mine = {"image_size": self.settings.image_size, "classes": self.images.classes}
            for key, value in mine.items():
                if meta.get(key) != value:
                    raise ConfigError(
                        f"{self.out}/meta.json says {key}={meta.get(key)!r} (another split), this encoding "
                        f"has {key}={value!r}: the splits of one folder must agree (use another --out)"
                    )

    def done_shards(self) -> set[int]:
        return {k for k in range(self.num_shards) if self.shard_path(k).is_file()}

    def shard_path(self, shard: int) -> Path:
        return self.shard_dir / f"{shard:06d}.npz"

    def shard_range(self, shard: int) -> range:
        size = self.settings.shard_size
        return range(shard * size, min((shard + 1) * size, self.num_items))

    def run(
        self,
        vae: SDVAE,
        *,
        batch_size: int,
        num_workers: int = 0,
        on_items: Callable[[int], None] = no_op,
        on_shard: Callable[[int], None] = no_op,
    ) -> dict:
        """Encode the missing shards, then assemble the split's files; returns the summary.

        `on_items(k)` after each batch of k items, `on_shard(shard)` after each shard file is
        written (Modal commits the Volume there)."""
        self.check()
        meta = read_meta(self.out) if (self.out / "meta.json").is_file() else None
        if meta is not None and (meta["vae"], float(meta["scale"])) != (vae.name, vae.scale):
            raise ConfigError(
                f"{self.out}/meta.json records the VAE {meta['vae']!r} (scale {meta['scale']}), this "
                f"encoding uses {vae.name!r} (scale {vae.scale}): the splits of one folder must agree"
            )
        latent_shape = vae.latent_shape((3, self.settings.image_size, self.settings.image_size))
        start = time.perf_counter()
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.shard_dir / PLAN_FILE, self.plan())
        todo = [k for k in range(self.num_shards) if k not in self.done_shards()]
        transform = CenterCropResize(self.settings.image_size, crop=self.settings.crop)
        items = FlipCopies(
            ImageFiles(self.images.files, self.images.labels, transform), self.settings.flip_copies
        )
        shards = self._encode_shards(vae, items, todo, latent_shape, batch_size, num_workers, on_items)
        for shard, latents, labels in shards:
            buffer = io.BytesIO()
            np.savez(buffer, latents=latents, labels=labels)
            atomic_write_bytes(self.shard_path(shard), buffer.getvalue())  # exists only when complete
            on_shard(shard)
        summary = {
            **self.plan(),
            "vae": vae.name,
            "scale": vae.scale,
            "latent_shape": list(latent_shape),
            "shards_encoded": len(todo),
            "seconds": time.perf_counter() - start,
        }
        atomic_write_json(self.out / f"{self.split}_encode.json", summary)
        atomic_write_json(
            self.out / "meta.json",
            {
                "classes": self.images.classes,
                "image_size": self.settings.image_size,
                "vae": vae.name,
                "scale": vae.scale,
                "latent_shape": list(latent_shape),
            },
        )
        self._assemble(latent_shape)
        shutil.rmtree(self.shard_dir)
        return summary

    def _encode_shards(
        self,
        vae: SDVAE,
        items: Dataset,
        todo: list[int],
        latent_shape: tuple[int, int, int],
        batch_size: int,
        num_workers: int,
        on_items: Callable[[int], None],
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, latents, labels) for each shard of `todo`, in order.  A shard's posterior noise
        is drawn whole from its own seed and batches never cross shards: its result does not
        depend on which shards were done before, nor on how its images are batched."""
        batches = []
        for shard in todo:
            rows = self.shard_range(shard)
            batches += [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        loader = DataLoader(items, batch_sampler=batches, num_workers=num_workers)
        sample = self.settings.posterior == "sample"
        pending = iter(todo)
        shard, noise, parts, filled = None, None, [], 0
        for images, labels in loader:
            if shard is None:
                shard = next(pending)
                generator = torch.Generator().manual_seed(shard_seed(self.settings.seed, shard))
                noise = torch.randn((len(self.shard_range(shard)), *latent_shape), generator=generator)
            x = images.to(vae.device).float() / 127.5 - 1.0
            z = vae.encode(x, sample=sample, noise=noise[filled : filled + len(images)])
            parts.append((z.to("cpu", torch.float16).numpy(), labels.numpy().astype(np.int64)))
            filled += len(images)
            on_items(len(images))
            if filled == len(self.shard_range(shard)):
                yield shard, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
                shard, parts, filled = None, [], 0

    def _assemble(self, latent_shape: tuple[int, int, int]) -> None:
        """The shards, in order, into {split}_latents.npy / _labels.npy.  The latents file comes
        last, after meta.json: until it exists, the same command assembles again."""
        temporary = self.latents_path.with_name(f".{self.latents_path.name}.tmp")
        out = np.lib.format.open_memmap(
            temporary, mode="w+", dtype=np.float16, shape=(self.num_items, *latent_shape)
        )
        labels = np.empty(self.num_items, dtype=np.int64)
        for shard in range(self.num_shards):
            with np.load(self.shard_path(shard)) as part:
                rows = self.shard_range(shard)
                out[rows.start : rows.stop] = part["latents"]
                labels[rows.start : rows.stop] = part["labels"]
        out.flush()
        del out
        buffer = io.BytesIO()
        np.save(buffer, labels)
        atomic_write_bytes(self.labels_path, buffer.getvalue())
        temporary.replace(self.latents_path)  # last: the latents file appears only when all is there


def default_out(dataset: Path) -> Path:
    """data/imagenet -> data/imagenet-latents (the folder data.latent_folder names by default)."""
    return dataset.parent / f"{dataset.name}-latents"


def encode_folder(
    dataset: Path,
    split: str,
    out: Path,
    settings: EncodeSettings,
    *,
    device: torch.device | str,
    batch_size: int,
    num_workers: int = 0,
    limit: int | None = None,
    on_start: Callable[[int, int], None] = no_op,
    on_items: Callable[[int], None] = no_op,
    on_shard: Callable[[int], None] = no_op,
) -> dict:
    """Encode `split` of `dataset` (see split_folder) into `out`; returns the summary.

    The images are listed and the output checked first, then the VAE is loaded (possibly
    downloaded: the slow step comes after every cheap check), then `on_start(items, items already
    done)` is called and the missing shards are encoded."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    encoding = LatentEncoding(list_images(split_folder(dataset, split), limit), out, split, settings)
    encoding.check()
    vae = load_vae(settings.vae, device)
    if settings.image_size % vae.downsample_factor:
        raise ConfigError(
            f"--image-size {settings.image_size} is not a multiple of {vae.downsample_factor}, the VAE's "
            "downsampling factor: pick one that is (256 for ImageNet-256)"
        )
    done = sum(len(encoding.shard_range(k)) for k in encoding.done_shards())
    on_start(encoding.num_items, done)
    return encoding.run(
        vae, batch_size=batch_size, num_workers=num_workers, on_items=on_items, on_shard=on_shard
    )
