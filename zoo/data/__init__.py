"""Datasets as batch sources: `build_data(cfg.data, device, seed, batch_size)` -> BatchSource."""

from collections.abc import Callable

import torch

from zoo import distributed
from zoo.config.schema import DataConfig
from zoo.data.base import BatchSource
from zoo.data.images import build_celeba, build_cifar10, build_digits, build_fashion_mnist, build_imagenet
from zoo.data.latents import build_imagenet_latents
from zoo.data.toy2d import TOY_DISTRIBUTIONS, Toy2DSource
from zoo.errors import DataNotFoundError

__all__ = ["BatchSource", "DataNotFoundError", "build_data"]

_IMAGE_BUILDERS: dict[str, Callable[[DataConfig, torch.device, int, int], BatchSource]] = {
    "digits": build_digits,
    "fashion-mnist": build_fashion_mnist,
    "cifar10": build_cifar10,
    "celeba": build_celeba,
    "imagenet": build_imagenet,
    "imagenet-latents": build_imagenet_latents,
}


def build_data(cfg: DataConfig, device: torch.device | str, seed: int, batch_size: int) -> BatchSource:
    """The batch source for `cfg.name`, returning batches of `batch_size` on `device`.

    `seed` fixes what is not drawn from the trainer's generator: the finite training set of a
    2-D source with `train_size`, and the epoch order of file-backed datasets (CelebA, ImageNet).

    With `data.download` under data parallelism, rank 0 builds first (downloading once) while
    the others wait; then they read what it wrote.  Several processes downloading into one
    folder would overwrite each other's half-written files.
    """
    if cfg.download and not distributed.is_main():
        distributed.wait_for_main()
    source = _build(cfg, torch.device(device), seed, batch_size)
    if cfg.download and distributed.is_main():
        distributed.wait_for_main()
    return source


def _build(cfg: DataConfig, device: torch.device, seed: int, batch_size: int) -> BatchSource:
    if cfg.name in TOY_DISTRIBUTIONS:
        if cfg.image_size is not None:
            raise ValueError(
                f"data.image_size does not apply to the 2-D dataset {cfg.name!r}: leave it unset"
            )
        dist = TOY_DISTRIBUTIONS[cfg.name]()
        return Toy2DSource(dist, batch_size, device, cfg.class_conditional, cfg.train_size, seed)
    return _IMAGE_BUILDERS[cfg.name](cfg, device, seed, batch_size)
