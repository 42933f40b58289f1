"""2-D toy distributions, drawn fresh every step with torch from the trainer's generator.

Scale: every distribution is centred (mean exactly 0) and scaled isotropically so that the
average per-coordinate variance is exactly 1 (trace of the covariance = 2), which keeps its
shape and puts it on the scale of the N(0, I) noise.  Per distribution (population values):

    moons         two interleaved half circles (sklearn's layout), noise 0.1 before scaling;
                  scale 1.4043: var x = 1.4987, var y = 0.5013, cov = -0.3812; labels: 0 upper, 1 lower moon
    checkerboard  8 occupied cells of a 4x4 board, uniform inside; var x = var y = 1,
                  cov = 3/16; labels: cell 0..7
    gaussians8    8 gaussians at angles k*pi/4 on a circle of radius sqrt(2 (1 - 0.1^2)) = 1.4071,
                  std 0.1; var x = var y = 1, cov 0; labels: k
    clusters      5 fixed centroids (k-means style blobs), isotropic std 0.2304;
                  var x = 1.2183, var y = 0.7817, cov = -0.0737; labels: centroid 0..4

With `train_size` set the source trains on a fixed finite set of that many points (drawn with the
run's seed) instead of fresh draws: the memorisation regime.
"""

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from zoo.data.base import HELD_OUT_SEED, REFERENCE_SEED, BatchSource, check_batch_size


class Toy2D(ABC):
    """A distribution on R^2 with numbered mixture components (used as class labels)."""

    name: str
    num_components: int

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n points (n, 2) float32 and their component labels (n,) long, on generator.device."""


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device)


def _components(n: int, k: int, generator: torch.Generator) -> Tensor:
    return torch.randint(k, (n,), generator=generator, device=generator.device)


class Moons(Toy2D):
    name = "moons"
    num_components = 2
    raw_noise = 0.1
    # Raw moons: upper (cos a, sin a), lower (1 - cos a, 1/2 - sin a), a ~ U[0, pi].
    # Mean (1/2, 1/4); var x = 3/4 + s^2, var y = 9/16 - 1/pi + s^2 (s = raw noise std),
    # cov = 1/8 - 1/pi.
    mean = (0.5, 0.25)
    scale = 1.0 / math.sqrt((0.75 + 0.5625 - 1 / math.pi) / 2 + raw_noise**2)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        label = _components(n, 2, generator)
        angle = math.pi * _uniform(n, generator)
        lower = label == 1
        x = torch.where(lower, 1 - torch.cos(angle), torch.cos(angle))
        y = torch.where(lower, 0.5 - torch.sin(angle), torch.sin(angle))
        points = torch.stack([x, y], dim=1)
        points = points + self.raw_noise * torch.randn(n, 2, generator=generator, device=generator.device)
        points = (points - torch.tensor(self.mean, device=points.device)) * self.scale
        return points, label


class Checkerboard(Toy2D):
    name = "checkerboard"
    num_components = 8
    # The occupied cells (i, j) of the 4x4 board on [-2, 2]^2: those with i + j even.  Every
    # column and row holds two cells, so each marginal is U[-2, 2] (variance 4/3).
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    scale = math.sqrt(3.0 / 4.0)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        label = _components(n, len(self.cells), generator)
        corner = torch.tensor(self.cells, dtype=torch.float32, device=generator.device)[label] - 2.0
        offset = torch.rand(n, 2, generator=generator, device=generator.device)
        return (corner + offset) * self.scale, label


class Gaussians8(Toy2D):
    name = "gaussians8"
    num_components = 8
    std = 0.1
    # Per-axis variance R^2 / 2 + std^2 = 1 (8 equally spaced angles average cos^2 to 1/2).
    radius = math.sqrt(2.0 * (1.0 - std**2))

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        label = _components(n, 8, generator)
        angle = label.float() * (math.pi / 4)
        centre = self.radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return centre + self.std * torch.randn(n, 2, generator=generator, device=generator.device), label


class Clusters(Toy2D):
    name = "clusters"
    num_components = 5
    raw_centroids = [(-3.0, -2.0), (3.0, -2.5), (0.5, 3.0), (-3.5, 2.0), (3.0, 1.5)]
    raw_std = 0.6

    def __init__(self) -> None:
        raw = torch.tensor(self.raw_centroids, dtype=torch.float64)
        mean = raw.mean(0)
        per_axis_var = raw.var(0, unbiased=False) + self.raw_std**2
        scale = 1.0 / per_axis_var.mean().sqrt()
        self.centroids = ((raw - mean) * scale).float()
        self.std = float(self.raw_std * scale)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        label = _components(n, 5, generator)
        centre = self.centroids.to(generator.device)[label]
        return centre + self.std * torch.randn(n, 2, generator=generator, device=generator.device), label


TOY_DISTRIBUTIONS: dict[str, type[Toy2D]] = {
    cls.name: cls for cls in (Moons, Checkerboard, Gaussians8, Clusters)
}


def _fixed_draw(dist: Toy2D, n: int, seed: int) -> tuple[Tensor, Tensor]:
    # A CPU generator: the same points whatever the training device.
    return dist.sample(n, torch.Generator().manual_seed(seed))


class Toy2DSource(BatchSource):
    is_image = False
    data_shape = (2,)

    def __init__(
        self,
        dist: Toy2D,
        batch_size: int,
        device: torch.device,
        class_conditional: bool,
        train_size: int | None,
        seed: int,
    ) -> None:
        self.dist = dist
        self.name = dist.name
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device)
        self.num_classes = dist.num_components if class_conditional else 0
        self.class_names = [f"{dist.name}-{k}" for k in range(self.num_classes)]
        self.num_train = train_size
        self.batches_drawn = 0
        if train_size is not None:
            points, labels = _fixed_draw(dist, train_size, seed)
            self.train_points = points.to(self.device)
            self.train_labels = labels.to(self.device)

    def _labels(self, labels: Tensor) -> Tensor | None:
        return labels.to(self.device) if self.num_classes else None

    def next_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        self.batches_drawn += 1
        if self.num_train is None:
            x, labels = self.dist.sample(self.batch_size, generator)
            return x.to(self.device), self._labels(labels)
        # A finite training set: uniform draws with replacement (no epoch state to save).
        index = torch.randint(
            self.num_train, (self.batch_size,), generator=generator, device=generator.device
        )
        index = index.to(self.device)
        return self.train_points[index], self._labels(self.train_labels[index])

    def held_out_labeled(self, n: int) -> tuple[Tensor, Tensor | None]:
        x, labels = _fixed_draw(self.dist, n, HELD_OUT_SEED)
        return x.to(self.device), self._labels(labels)

    def reference(self, n: int) -> Tensor:
        if self.num_train is None:
            return _fixed_draw(self.dist, n, REFERENCE_SEED)[0].to(self.device)
        return self.train_points[:n]

    def state_dict(self) -> dict[str, Any]:
        # Fresh draws come from the trainer's generator alone; the count is for the record.
        return {"name": self.name, "num_train": self.num_train, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.batches_drawn = state["batches_drawn"]
