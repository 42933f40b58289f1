"""Sample quality in a classifier's feature space: FD, KID, precision and recall, each an `Estimate`
with its standard error and the number of samples behind it.

Inputs are feature rows (n, d) of real and generated images (`zoo.metrics.features`); everything
that sums or cancels runs in float64.

- FD: the Fréchet distance between Gaussians fitted to the two sets (FID's formula, in this
  feature space).  Its s.e. is the delete-a-group jackknife's: both sets split at random into 20
  groups, FD recomputed without each group (all from one pass over the data: the left-out
  statistics are the totals minus the group's sums).  FD is biased upwards by O(d / n), so it is
  only comparable at equal n: compare with the real-vs-real floor at the same n.
- KID: the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et
  al. 2018) of the whole sets (all pairs, in blocks).  Its s.e. is the delete-a-group jackknife's
  over 20 random groups of both sets, as FD's, from the kernel sums between each pair of groups
  (one pass over the pairs).  Unbiased: its mean is 0 for equal distributions, so small negative
  values are expected there; there MMD^2 is a degenerate U-statistic, whose variance the
  jackknife about doubles (s.e. 1.4-1.5x too large); elsewhere it matches the spread of
  independent draws.
- Precision and recall (Kynkaanniemi et al. 2019): a set's manifold is the union of balls around
  its points reaching each point's k-th nearest neighbour in the set.  Precision is the fraction
  of generated points inside the real manifold, recall the fraction of real points inside the
  generated one.  Their s.e. counts the noise of both sets, the manifolds' included (a new sample
  redraws them; a binomial s.e. given the manifold is too small): both sets are split at random
  into 10 disjoint parts, precision and recall computed on each pair of parts, and s.e. =
  sd(parts) / sqrt(10), their variance scaling as 1 / n (a delete-a-group jackknife, as FD's,
  over-estimates it: the k-NN radii are not smooth in the data).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from zoo.errors import MetricInputError
from zoo.metrics.fid import feature_statistics
from zoo.metrics.fid import frechet_distance as gaussian_frechet_distance

# Per side, whatever the feature size: precision/recall's parts of at least 20 samples and the
# jackknife groups of FD and KID of at least 10.
MIN_SAMPLES = 200
FD_JACKKNIFE_GROUPS = 20
KID_JACKKNIFE_GROUPS = 20
PR_NEIGHBOURS = 3  # Kynkaanniemi et al.'s k
PR_PARTS = 10  # disjoint parts behind precision/recall's s.e.
_ROWS_PER_BLOCK = 2048  # rows of a distance block, rows and columns of a kernel block: bounds memory


@dataclass(frozen=True)
class Estimate:
    """A metric's value, its standard error and the number of samples it rests on."""

    value: float
    stderr: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "stderr": self.stderr, "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.4g} ± {self.stderr:.2g}"


def required_samples(dim: int) -> int:
    """Samples per side every metric here needs: MIN_SAMPLES, and more rows than feature
    dimensions for the covariances of FD."""
    return max(MIN_SAMPLES, dim + 1)


def check_sample_count(n_real: int, n_fake: int, dim: int) -> None:
    """A MetricInputError naming the minimum when either side has too few samples."""
    needed = required_samples(dim)
    if min(n_real, n_fake) < needed:
        raise MetricInputError(
            f"feature metrics need at least {needed} samples on each side ({dim}-D features), got "
            f"{n_real} real and {n_fake} generated: raise the number of samples (--n)"
        )


def _rows(features: Tensor) -> Tensor:
    return features.reshape(len(features), -1).to(torch.float64)


def _check_pair(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    real, fake = _rows(real), _rows(fake).to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} real vs {fake.shape[1]} generated")
    return real, fake


def _group_sums(x: Tensor, groups: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per group: the number of rows, their sum (count, d) and their Gram matrix (count, d, d)."""
    sizes = torch.bincount(groups, minlength=count).to(x)
    sums = torch.zeros(count, x.shape[1], dtype=x.dtype).index_add_(0, groups, x)
    grams = torch.stack([x[groups == g].T @ x[groups == g] for g in range(count)])
    return sizes, sums, grams


def _statistics_from_sums(size: Tensor, total: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
    mu = total / size
    return mu, (gram - size * torch.outer(mu, mu)) / (size - 1)


def _leave_group_out_statistics(x: Tensor, groups: Tensor, count: int) -> list[tuple[Tensor, Tensor]]:
    """Mean and covariance of x without each group's rows, from one pass over the data.  Centred
    on the overall mean first: the Gram-minus-outer-product formula then cancels nothing large."""
    centre = x.mean(0)
    sizes, sums, grams = _group_sums(x - centre, groups, count)
    size, total, gram = sizes.sum(), sums.sum(0), grams.sum(0)
    statistics = [
        _statistics_from_sums(size - sizes[g], total - sums[g], gram - grams[g]) for g in range(count)
    ]
    return [(centre + mu, cov) for mu, cov in statistics]


def random_groups(n_real: int, n_fake: int, groups: int, seed: int) -> tuple[Tensor, Tensor]:
    """A random group (0 .. groups-1) for each real and each generated row, each group getting the
    same share of each set: a random order cut round-robin."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randperm(n, generator=generator) % groups for n in (n_real, n_fake))


def jackknife_stderr(replicates: Tensor) -> float:
    """The delete-a-group jackknife s.e. from the G leave-one-group-out values:
    s.e.^2 = (G - 1) / G * sum_g (value_(g) - mean)^2."""
    count = len(replicates)
    replicates = replicates.double()
    return float(((count - 1) / count * (replicates - replicates.mean()).square().sum()).sqrt())


def frechet_distance(
    real: Tensor, fake: Tensor, groups: int = FD_JACKKNIFE_GROUPS, seed: int = 0
) -> Estimate:
    """FD between Gaussians fitted to real (n, d) and fake (m, d) features, with the delete-a-group
    jackknife s.e.: both sets are split at random into `groups` parts, FD is recomputed without
    each part (of both sets), and s.e.^2 = (G - 1) / G * sum_g (FD_(g) - mean)^2.  n of the
    estimate: the generated samples."""
    real, fake = _check_pair(real, fake)
    if min(len(real), len(fake)) < 2 * groups:
        raise MetricInputError(
            f"FD's jackknife needs at least {2 * groups} samples on each side, got {len(real)} real and "
            f"{len(fake)} generated"
        )
    value = gaussian_frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    real_groups, fake_groups = random_groups(len(real), len(fake), groups, seed)
    left_out = zip(
        _leave_group_out_statistics(real, real_groups, groups),
        _leave_group_out_statistics(fake, fake_groups, groups),
        strict=True,
    )
    replicates = torch.tensor([gaussian_frechet_distance(*r, *f) for r, f in left_out], dtype=torch.float64)
    return Estimate(value, jackknife_stderr(replicates), len(fake))


def _kernel_group_sums(
    count: int, x: Tensor, x_groups: Tensor, y: Tensor | None = None, y_groups: Tensor | None = None
) -> Tensor:
    """(count, count): the sums of k(x_i, y_j) over each pair of an x group and a y group.  Without
    y: within x, pairs i = j left out, and only the blocks on and above the diagonal computed (the
    kernel matrix is symmetric)."""
    within = y is None
    if within:
        y, y_groups = x, x_groups
    x_hot = torch.nn.functional.one_hot(x_groups, count).to(x)
    y_hot = torch.nn.functional.one_hot(y_groups, count).to(y)
    sums = torch.zeros(count, count, dtype=x.dtype, device=x.device)
    for i in range(0, len(x), _ROWS_PER_BLOCK):
        rows = slice(i, i + _ROWS_PER_BLOCK)
        for j in range(i if within else 0, len(y), _ROWS_PER_BLOCK):
            cols = slice(j, j + _ROWS_PER_BLOCK)
            block = (x[rows] @ y[cols].T).div_(x.shape[1]).add_(1.0).pow_(3)
            if within and i == j:
                block.fill_diagonal_(0.0)
            part = x_hot[rows].T @ block @ y_hot[cols]
            sums += part + part.T if within and i != j else part
    return sums


def _unbiased_mmd2(n_x: Tensor, n_y: Tensor, within_x: Tensor, within_y: Tensor, across: Tensor) -> Tensor:
    """Unbiased MMD^2 from the kernel sums within each set (i != j) and across the sets."""
    return within_x / (n_x * (n_x - 1)) + within_y / (n_y * (n_y - 1)) - 2 * across / (n_x * n_y)


def kernel_distance(
    real: Tensor, fake: Tensor, groups: int = KID_JACKKNIFE_GROUPS, seed: int = 0
) -> Estimate:
    """KID: the unbiased MMD^2 of real (n, d) and fake (m, d) features under the cubic polynomial
    kernel, over all pairs, with the delete-a-group jackknife s.e.: both sets are split at random
    into `groups` parts (as FD's), KID is recomputed without each part (of both sets) from the
    kernel sums between parts, and s.e.^2 = (G - 1) / G * sum_g (KID_(g) - mean)^2.  n of the
    estimate: the generated samples."""
    real, fake = _check_pair(real, fake)
    if min(len(real), len(fake)) < 2 * groups:
        raise MetricInputError(
            f"KID's jackknife needs at least {2 * groups} samples on each side, got {len(real)} real and "
            f"{len(fake)} generated"
        )
    real_groups, fake_groups = random_groups(len(real), len(fake), groups, seed)
    sums = (
        _kernel_group_sums(groups, real, real_groups),
        _kernel_group_sums(groups, fake, fake_groups),
        _kernel_group_sums(groups, real, real_groups, fake, fake_groups),
    )
    n_real, n_fake = (torch.tensor(float(len(x)), dtype=torch.float64) for x in (real, fake))
    value = _unbiased_mmd2(n_real, n_fake, *(s.sum() for s in sums))
    # Without group g of both sets: the totals less row g and column g (their common entry once).
    without = [s.sum() - s.sum(1) - s.sum(0) + s.diagonal() for s in sums]
    real_sizes = n_real - torch.bincount(real_groups, minlength=groups).to(real)
    fake_sizes = n_fake - torch.bincount(fake_groups, minlength=groups).to(fake)
    replicates = _unbiased_mmd2(real_sizes, fake_sizes, *without)
    return Estimate(float(value), jackknife_stderr(replicates), len(fake))


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    return torch.addmm(b.square().sum(1)[None, :], a, b.T, alpha=-2.0).add_(a.square().sum(1)[:, None])


def knn_radii(x: Tensor, k: int) -> Tensor:
    """Squared distance from each row of x to its k-th nearest other row."""
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), _ROWS_PER_BLOCK):
        block = _squared_distances(x[start : start + _ROWS_PER_BLOCK], x)
        rows = torch.arange(len(block), device=x.device)
        block[rows, rows + start] = math.inf  # a point is not its own neighbour
        radii[start : start + len(block)] = block.topk(k, dim=1, largest=False).values[:, -1]
    return radii


def inside_manifold(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """For each point, whether it lies in a ball around some centre (squared radii `radii`)."""
    inside = torch.empty(len(points), dtype=torch.bool, device=points.device)
    for start in range(0, len(points), _ROWS_PER_BLOCK):
        block = _squared_distances(points[start : start + _ROWS_PER_BLOCK], centres)
        inside[start : start + len(block)] = (block <= radii[None, :]).any(1)
    return inside


def precision_recall_values(real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Precision and recall of one pair of sets, without standard errors."""
    precision = inside_manifold(fake, real, knn_radii(real, k))
    recall = inside_manifold(real, fake, knn_radii(fake, k))
    return float(precision.double().mean()), float(recall.double().mean())


def precision_recall(
    real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS, parts: int = PR_PARTS, seed: int = 0
) -> tuple[Estimate, Estimate]:
    """Kynkaanniemi et al.'s precision (generated points in the real k-NN manifold) and recall
    (real points in the generated manifold) of the whole sets; their s.e. is sd / sqrt(parts) of
    the values on `parts` disjoint random parts of both sets (manifolds rebuilt in each)."""
    real, fake = _check_pair(real, fake)
    if min(len(real), len(fake)) < parts * (k + 1):
        raise MetricInputError(
            f"precision/recall with k={k} over {parts} disjoint parts needs at least {parts * (k + 1)} "
            f"samples on each side, got {len(real)} real and {len(fake)} generated"
        )
    # float32 distances: they are only compared with radii, never summed, and it halves the time.
    real, fake = real.float(), fake.float()
    precision, recall = precision_recall_values(real, fake, k)
    real_parts, fake_parts = random_groups(len(real), len(fake), parts, seed)
    values = torch.tensor(
        [precision_recall_values(real[real_parts == i], fake[fake_parts == i], k) for i in range(parts)],
        dtype=torch.float64,
    )
    stderr = values.std(0) / math.sqrt(parts)
    return Estimate(precision, float(stderr[0]), len(fake)), Estimate(recall, float(stderr[1]), len(real))


def _binomial(indicators: Tensor) -> Estimate:
    n = len(indicators)
    p = float(indicators.double().mean())
    return Estimate(p, math.sqrt(p * (1 - p) / n), n)


def score_features(real: Tensor, fake: Tensor, seed: int = 0) -> dict[str, Estimate]:
    """FD, KID, precision and recall of generated features against real ones (n, d) each;
    a MetricInputError naming the minimum if either side has fewer than `required_samples(d)`."""
    real, fake = _check_pair(real, fake)
    check_sample_count(len(real), len(fake), real.shape[1])
    precision, recall = precision_recall(real, fake, seed=seed)
    return {
        "fd": frechet_distance(real, fake, seed=seed),
        "kid": kernel_distance(real, fake, seed=seed),
        "precision": precision,
        "recall": recall,
    }


def class_fidelity(logits: Tensor, labels: Tensor) -> Estimate:
    """The feature net's accuracy on samples generated for classes `labels` (n,), from its
    logits (n, classes): how often a sample looks like the class it was asked for; binomial s.e."""
    if len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need one label per sample, got {len(logits)} samples and {len(labels)} labels")
    return _binomial(logits.argmax(1).cpu() == labels.cpu())


def per_class_fd(
    real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor, seed: int = 0
) -> dict[int, Estimate]:
    """FD between real and generated features of each class present on both sides; a
    MetricInputError naming the minimum when a class has too few samples for a covariance."""
    real, fake = _check_pair(real, fake)
    real_labels, fake_labels = real_labels.cpu(), fake_labels.cpu()
    classes = sorted(set(real_labels.tolist()) & set(fake_labels.tolist()))
    needed = max(2 * FD_JACKKNIFE_GROUPS, real.shape[1] + 1)
    scores = {}
    for c in classes:
        real_c, fake_c = real[real_labels == c], fake[fake_labels == c]
        if min(len(real_c), len(fake_c)) < needed:
            raise MetricInputError(
                f"per-class FD needs at least {needed} samples of each class on each side, class {c} has "
                f"{len(real_c)} real and {len(fake_c)} generated: raise the number of samples (--n)"
            )
        scores[c] = frechet_distance(real_c, fake_c, seed=seed)
    return scores
