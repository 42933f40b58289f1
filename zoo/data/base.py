"""The interface every zoo dataset implements: an endless, resumable stream of batches.

Randomness rule (seeded generators inside DataLoader workers would draw the same noise in every
worker, identically every epoch): a source draws every random number
(shuffling permutations, flips, synthetic samples) from the `torch.Generator` the trainer passes
to `next_batch`, or from state it returns in `state_dict()`.  DataLoader workers, where used, only
decode and resize.  Saving the trainer's generator state together with `state_dict()` therefore
makes a resumed run continue the exact same batch sequence.
"""

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

# Fixed seeds for evaluation sets: the same held-out / reference samples for every run and every
# training seed, so metrics of different runs are comparable.
HELD_OUT_SEED = 1_000_003
REFERENCE_SEED = 2_000_003


class BatchSource(ABC):
    """An endless stream of training batches plus fixed evaluation samples.

    Attributes:
        name: dataset name as in `DataConfig.name`.
        data_shape: shape of one sample, e.g. (2,) or (3, 32, 32).
        num_classes: 0 for unconditional training, else the number of classes (labels 0..K-1).
        class_names: one name per class (empty when unconditional).
        is_image: True for pixel data in [-1, 1] shaped (C, H, W).
        is_latent: True for VAE latents (decode them before viewing or computing FID).
        batch_size: samples per `next_batch`.
        device: where batches are returned.
        num_train: size of the training set, None for fresh synthetic draws every step.
    """

    name: str
    data_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str]
    is_image: bool
    is_latent: bool = False
    batch_size: int
    device: torch.device
    num_train: int | None

    @abstractmethod
    def next_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """The next training batch: x (batch_size, *data_shape) float on `device`, and labels
        (batch_size,) long when class-conditional, else None."""

    @abstractmethod
    def held_out_labeled(self, n: int) -> tuple[Tensor, Tensor | None]:
        """Up to n real samples never used for training (the test split, or fresh draws from a
        fixed seed for synthetic data), on `device`, and their labels when class-conditional.
        Fewer than n only when the held-out split is smaller (digits: 297)."""

    def held_out(self, n: int) -> Tensor:
        return self.held_out_labeled(n)[0]

    @abstractmethod
    def reference(self, n: int) -> Tensor:
        """Up to n samples from the training distribution (a fixed subset of the training set,
        or an independent fixed-seed draw for synthetic data) on `device`: compared with
        `held_out` they give the data-vs-data noise floor of a metric."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same batch sequence (with the trainer's generator)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # True when every data-parallel rank reads one shared order (each its own share, `shard`),
    # so rank 0's saved state is every rank's; False when each rank draws its own order from its
    # own generator (rank 0's state must then not be replayed by the others).
    order_shared_across_ranks: bool = False

    def shard(self, rank: int, world: int) -> None:  # noqa: B027 (an intended no-op default)
        """Become data-parallel rank `rank` of `world`.  Sources drawing from the trainer's
        per-rank generator need nothing; a shared order is cut into disjoint shares here."""

    def describe(self) -> str:
        """One line for logs."""
        size = "fresh draws" if self.num_train is None else f"{self.num_train} training samples"
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return (
            f"{self.name}: shape {self.data_shape}, {size}{classes}, batch {self.batch_size} on {self.device}"
        )

    def _check_state(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name or state["num_train"] != self.num_train:
            raise ValueError(
                f"data state is for {state['name']!r} with {state['num_train']} training samples, "
                f"but this run uses {self.name!r} with {self.num_train}: resume with the same "
                "data.name and data.train_size"
            )


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image of (B, C, H, W) left-right with probability 1/2, drawing from `generator`."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size
