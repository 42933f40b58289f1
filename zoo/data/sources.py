"""Batch sources over finite datasets.

TensorSource: the whole dataset is one tensor (on the device when `on_device`), shuffled with a
per-epoch permutation drawn from the trainer's generator; flips drawn from the same generator.
LoaderSource: a DataLoader whose workers only decode and resize files; the order comes from a
sampler whose per-epoch permutation is a pure function of (seed, epoch), so the state to resume is
one integer, and flips are drawn on the device from the trainer's generator.  Data-parallel ranks
share that order and each reads a disjoint share of every global batch.  (TensorSource ranks
each shuffle with their own generator: independent epochs per rank.)

Both treat the epochs as one endless stream of indices cut into batches, so a batch may straddle
two epochs, every sample is seen once per epoch and a resumed run may even change the batch size.
"""

import atexit
import signal
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from zoo.data.base import HELD_OUT_SEED, REFERENCE_SEED, BatchSource, check_batch_size, random_flip
from zoo.interrupts import SIGNALS  # the signals that ask training to stop


@dataclass
class Split:
    """Samples (N, *shape) and their labels (N,) long."""

    data: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if len(self.data) != len(self.labels):
            raise ValueError(f"{len(self.data)} samples but {len(self.labels)} labels")


def fixed_subset(size: int, n: int, seed: int) -> Tensor:
    """n distinct indices out of `size`, the same for every run (a CPU generator with a fixed seed)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]


def limit_train(split: Split, train_size: int | None, name: str) -> Split:
    """The first `train_size` training samples (all of them when None)."""
    if train_size is None:
        return split
    if train_size > len(split.data):
        raise ValueError(
            f"data.train_size={train_size} but {name} has only {len(split.data)} training samples"
        )
    return Split(split.data[:train_size], split.labels[:train_size])


class TensorSource(BatchSource):
    """A dataset held as one tensor.

    `max_value` set: the data are integer pixel values 0..max_value (stored as uint8 to save memory)
    mapped to [-1, 1] per batch; None: the data are floats used as they are (latents).
    """

    def __init__(
        self,
        name: str,
        train: Split,
        test: Split,
        *,
        max_value: float | None,
        batch_size: int,
        device: torch.device,
        on_device: bool,
        hflip: bool,
        num_classes: int,
        class_names: list[str],
        is_image: bool = True,
        is_latent: bool = False,
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.storage_device = self.device if on_device else torch.device("cpu")
        self.train = Split(train.data.to(self.storage_device), train.labels.to(self.storage_device))
        self.test = test
        self.max_value = max_value
        self.batch_size = check_batch_size(batch_size)
        self.hflip = hflip
        self.num_classes = num_classes
        self.class_names = class_names
        self.is_image = is_image
        self.is_latent = is_latent
        self.data_shape = tuple(train.data.shape[1:])
        self.num_train = len(train.data)
        if self.num_train == 0:
            raise ValueError(f"{name}: the training set is empty")
        # Before the first batch: "epoch -1 fully consumed", so the first call draws epoch 0.
        self.epoch = -1
        self.position = self.num_train
        self.permutation = torch.empty(0, dtype=torch.long)

    def _to_float(self, data: Tensor) -> Tensor:
        data = data.to(self.device, non_blocking=True)
        if self.max_value is None:
            return data.float()
        return data.float() * (2.0 / self.max_value) - 1.0

    def _labels(self, labels: Tensor) -> Tensor | None:
        return labels.to(self.device) if self.num_classes else None

    def _next_indices(self, generator: torch.Generator) -> Tensor:
        parts = []
        needed = self.batch_size
        while needed:
            if self.position == self.num_train:
                self.permutation = torch.randperm(
                    self.num_train, generator=generator, device=generator.device
                )
                self.permutation = self.permutation.to(self.storage_device)
                self.epoch += 1
                self.position = 0
            take = min(needed, self.num_train - self.position)
            parts.append(self.permutation[self.position : self.position + take])
            self.position += take
            needed -= take
        return torch.cat(parts)

    def next_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        index = self._next_indices(generator)
        x = self._to_float(self.train.data[index])
        if self.hflip:
            x = random_flip(x, generator)
        return x, self._labels(self.train.labels[index])

    def held_out_labeled(self, n: int) -> tuple[Tensor, Tensor | None]:
        index = fixed_subset(len(self.test.data), n, HELD_OUT_SEED)
        return self._to_float(self.test.data[index]), self._labels(self.test.labels[index])

    def reference(self, n: int) -> Tensor:
        index = fixed_subset(self.num_train, n, REFERENCE_SEED).to(self.storage_device)
        return self._to_float(self.train.data[index])

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_train": self.num_train,
            "epoch": self.epoch,
            "position": self.position,
            # The permutation was drawn from the generator at the start of the epoch: it cannot
            # be redrawn on resume, so it is saved (int32 halves the checkpoint's share).
            "permutation": self.permutation.to("cpu", torch.int32),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.permutation = state["permutation"].to(self.storage_device, torch.long)


# ---------------------------------------------------------------------------------------------
# Files decoded by DataLoader workers


class CenterCropResize:
    """Centre-crop to a square (side `crop`, or the shorter side when None), then resize to `size`.

    A class rather than a closure so DataLoader workers started with `spawn` can pickle it.
    """

    def __init__(self, size: int, crop: int | None = None) -> None:
        self.size = size
        self.crop = crop

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        side = min(width, height) if self.crop is None else self.crop
        if side > min(width, height):
            raise ValueError(f"cannot crop {side}x{side} from a {width}x{height} image")
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        # PIL's bicubic filter widens with the scale factor: downsampling is antialiased.
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC)


class ImageFiles(Dataset):
    """Image files with labels: decoded to RGB, cropped/resized, returned as uint8 (3, H, W).

    No randomness here (flips happen on the device): workers cannot draw correlated noise.
    """

    def __init__(self, files: list[Path], labels: list[int], transform: CenterCropResize) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = files
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.files[index]) as image:
            image = self.transform(image.convert("RGB"))
        array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
        return torch.from_numpy(array), self.labels[index]


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(size)


class StreamBatchSampler:
    """Batches of indices from the endless stream permutation(seed, 0) ++ permutation(seed, 1) ++ ...,
    starting at stream position `start`.

    Data-parallel: the stream is cut into global batches of batch_size * world and rank r takes
    the r-th share of each, so the ranks' batches are disjoint and together are exactly what one
    process with the global batch would read.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start: int, rank: int = 0, world: int = 1
    ) -> None:
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world = world

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = divmod(self.start, self.size)
        order = epoch_permutation(self.size, self.seed, epoch)
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        while True:
            batch: list[int] = []
            while len(batch) < self.batch_size * self.world:
                if position == self.size:
                    epoch += 1
                    position = 0
                    order = epoch_permutation(self.size, self.seed, epoch)
                take = min(self.batch_size * self.world - len(batch), self.size - position)
                batch.extend(order[position : position + take].tolist())
                position += take
            yield batch[share]


def leave_stop_signals_to_parent(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: the training process decides when to stop.

    A terminal's Ctrl-C reaches the whole foreground process group, workers included (and
    torchrun's SIGTERM its ranks' groups); a worker dead of it would fail the batch a held step is
    waiting for, a failed run instead of a clean stop (zoo.interrupts).  Workers still end
    with their parent (DataLoader's watchdog) and with SIGKILL.  They start with the signals
    blocked (iter_with_workers), so one sent before this runs waits, and is then dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


# Iterators whose workers may still run; ended at exit by end_live_workers.
_live_iterators: "weakref.WeakSet[Any]" = weakref.WeakSet()


def end_live_workers() -> None:
    """At interpreter exit, ends the workers of iterators still alive (a crash's traceback keeps
    them: sys.last_traceback) the way DataLoader does, by telling them to finish.

    Without it multiprocessing's own exit hook ends daemonic workers with SIGTERM, which ours
    ignore, and then waits for them forever: a crashed run would hang instead of exiting."""
    for iterator in list(_live_iterators):
        try:
            iterator._shutdown_workers()
        except Exception:  # one iterator's failure must not leave the others' workers running
            pass


# Registered after multiprocessing's exit hook and torch's (imported above; after torch's hook
# DataLoader skips its shutdown), so it runs before both: atexit runs the last registered first.
# (multiprocessing.get_logger() would register its hook again; zoo never calls it.)
atexit.register(end_live_workers)


def worker_start_method(num_workers: int) -> str | None:
    """ "fork" for DataLoader workers on Linux (None: DataLoader's default elsewhere, or no workers).

    Fork was Linux's default up to Python 3.13; 3.14 makes it forkserver, whose workers are
    children of the fork server and take its signal mask, not the one iter_with_workers sets, so
    a Ctrl-C could kill them before worker_init_fn ignores it."""
    return "fork" if num_workers > 0 and sys.platform.startswith("linux") else None


def iter_with_workers(loader: DataLoader) -> Iterator[Any]:
    """iter(loader), its workers started with Ctrl-C and SIGTERM blocked.

    A worker inherits the signal mask of the thread that starts it (fork, the start method on
    Linux up to Python 3.13): blocked, a signal cannot kill it (or run the parent's handler in it)
    before its worker_init_fn ignores it.  In this process a signal arriving meanwhile is only
    delayed until the mask is restored, never lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        iterator = iter(loader)
        # Before the mask is restored: a handler raising then (Ctrl-C) must not leave these
        # workers out of end_live_workers.
        if hasattr(iterator, "_shutdown_workers"):  # started workers (num_workers > 0)
            _live_iterators.add(iterator)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return iterator


class LoaderSource(BatchSource):
    """Large image datasets read from files by DataLoader workers."""

    is_image = True

    def __init__(
        self,
        name: str,
        train: ImageFiles,
        test: ImageFiles,
        *,
        batch_size: int,
        device: torch.device,
        seed: int,
        num_workers: int,
        hflip: bool,
        num_classes: int,
        class_names: list[str],
        image_size: int,
    ) -> None:
        self.name = name
        self.train = train
        self.test = test
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device)
        self.seed = seed
        self.num_workers = num_workers
        self.hflip = hflip
        self.num_classes = num_classes
        self.class_names = class_names
        self.data_shape = (3, image_size, image_size)
        self.num_train = len(train)
        if self.num_train == 0:
            raise ValueError(f"{name}: the training set is empty")
        self.consumed = 0  # position in the endless index stream (all ranks' batches together)
        self.rank, self.world = 0, 1
        self._iterator: Iterator[tuple[Tensor, Tensor]] | None = None

    order_shared_across_ranks = True

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self._iterator = None

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        # A private generator: DataLoader draws its worker base seed from it when an iterator
        # starts, which would otherwise advance torch's global RNG.
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=leave_stop_signals_to_parent,
            multiprocessing_context=worker_start_method(self.num_workers),
            **kwargs,
        )

    def _to_float(self, images: Tensor) -> Tensor:
        return images.to(self.device, non_blocking=True).float() / 127.5 - 1.0

    def _labels(self, labels: Tensor) -> Tensor | None:
        return labels.to(self.device) if self.num_classes else None

    def _stream(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The training batches from the current stream position on (starts the workers)."""
        sampler = StreamBatchSampler(
            self.num_train, self.batch_size, self.seed, self.consumed, self.rank, self.world
        )
        return iter_with_workers(self._loader(self.train, batch_sampler=sampler))

    def next_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        if self._iterator is None:
            self._iterator = self._stream()
        images, labels = next(self._iterator)
        self.consumed += len(images) * self.world
        x = self._to_float(images)
        if self.hflip:
            x = random_flip(x, generator)
        return x, self._labels(labels)

    def _load(self, dataset: ImageFiles, index: Tensor) -> tuple[Tensor, Tensor]:
        loader = self._loader(Subset(dataset, index.tolist()), batch_size=256, shuffle=False)
        images, labels = zip(*iter_with_workers(loader), strict=True)
        return torch.cat(images), torch.cat(labels)

    def held_out_labeled(self, n: int) -> tuple[Tensor, Tensor | None]:
        images, labels = self._load(self.test, fixed_subset(len(self.test), n, HELD_OUT_SEED))
        return self._to_float(images), self._labels(labels)

    def reference(self, n: int) -> Tensor:
        return self._to_float(self._load(self.train, fixed_subset(self.num_train, n, REFERENCE_SEED))[0])

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_train": self.num_train, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.seed = state["seed"]
        self.consumed = state["consumed"]
        self._iterator = None  # restarts the workers at the restored stream position
