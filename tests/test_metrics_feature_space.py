"""FD, KID and precision/recall on feature rows: closed forms, brute-force references, and standard
errors checked against the spread of repeated draws."""

import itertools

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from zoo.errors import MetricInputError
from zoo.metrics import feature_metrics
from zoo.metrics.feature_metrics import (
    MIN_SAMPLES,
    Estimate,
    class_fidelity,
    frechet_distance,
    kernel_distance,
    knn_radii,
    per_class_fd,
    precision_recall,
    precision_recall_values,
    random_groups,
    score_features,
)
from zoo_cli.errors import USAGE_ERRORS


def gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    root = torch.linalg.cholesky(cov)
    return mean + torch.randn(n, len(mean), generator=generator, dtype=torch.float64) @ root.T


def closed_form_fd(mu1, cov1, mu2, cov2) -> float:
    cross = sqrtm(cov1.numpy() @ cov2.numpy()).real
    return float((mu1 - mu2).square().sum()) + float(np.trace(cov1.numpy() + cov2.numpy() - 2 * cross))


def test_fd_of_two_gaussians_matches_the_closed_form_within_its_stderr():
    g = torch.Generator().manual_seed(0)
    d = 4
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov1 = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    cov2 = torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64))
    mu1 = torch.zeros(d, dtype=torch.float64)
    mu2 = torch.tensor([1.0, -0.5, 0.0, 0.25], dtype=torch.float64)
    truth = closed_form_fd(mu1, cov1, mu2, cov2)
    estimate = frechet_distance(gaussian(20_000, mu1, cov1, g), gaussian(20_000, mu2, cov2, g))
    assert estimate.n == 20_000
    assert 0 < estimate.stderr < 0.05 * truth
    assert abs(estimate.value - truth) < 4 * estimate.stderr


def test_fd_stderr_matches_the_spread_of_independent_draws():
    """The jackknife s.e. of one draw against the standard deviation of FD over 40 draws."""
    g = torch.Generator().manual_seed(1)
    d = 3
    mu2 = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64)
    cov2 = torch.diag(torch.tensor([1.5, 1.0, 0.7], dtype=torch.float64))
    eye, zero = torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    estimates = [
        frechet_distance(gaussian(1000, zero, eye, g), gaussian(1000, mu2, cov2, g)) for _ in range(40)
    ]
    spread = float(np.std([e.value for e in estimates], ddof=1))
    stderr = float(np.mean([e.stderr for e in estimates]))
    assert 0.7 < stderr / spread < 1.5


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1) ** 3


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 from the full kernel matrices, their diagonals (i = j) left out within a set."""
    n, m = len(x), len(y)
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * polynomial_kernel(x, y).mean())


def test_kid_is_the_unbiased_mmd2_of_a_pairwise_sum():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    n, m = len(x), len(y)
    within_x = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    within_y = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert kernel_distance(x, y, groups=3).value == pytest.approx(within_x + within_y - 2 * across, rel=1e-12)


def test_kid_and_its_jackknife_match_a_direct_recomputation(monkeypatch):
    """The value is the unbiased MMD^2 of the whole sets; the s.e. the delete-a-group jackknife of
    that MMD^2 recomputed from scratch without each group, blocks of 37 rows or the default."""
    g = torch.Generator().manual_seed(11)
    real, fake = torch.randn(130, 5, generator=g), 1.2 * torch.randn(110, 5, generator=g) + 0.3
    x, y = real.double().numpy(), fake.double().numpy()
    real_groups, fake_groups = (part.numpy() for part in random_groups(130, 110, 20, 3))
    replicates = np.array(
        [direct_mmd2(x[real_groups != i], y[fake_groups != i]) for i in range(20)], dtype=np.float64
    )
    truth_stderr = np.sqrt(19 / 20 * ((replicates - replicates.mean()) ** 2).sum())
    estimate = kernel_distance(real, fake, seed=3)
    monkeypatch.setattr(feature_metrics, "_ROWS_PER_BLOCK", 37)
    blocked = kernel_distance(real, fake, seed=3)
    for kid in (estimate, blocked):
        assert kid.value == pytest.approx(direct_mmd2(x, y), rel=1e-10)
        assert kid.stderr == pytest.approx(truth_stderr, rel=1e-8)
        assert kid.n == 110


def kid_draws(shift: float, seed: int) -> list[Estimate]:
    """KID of 200 independent pairs of 200 8-D standard Gaussians, the second set's mean shifted
    by `shift` along every axis."""
    g = torch.Generator().manual_seed(seed)
    return [
        kernel_distance(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + shift)
        for _ in range(200)
    ]


def test_kid_of_one_distribution_is_zero_within_its_stderr():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(4000, 16, generator=g).relu(), torch.randn(4000, 16, generator=g).relu()
    kid = kernel_distance(real, fake)
    assert kid.n == 4000
    assert abs(kid.value) < 3 * kid.stderr
    shifted = kernel_distance(real, fake + 0.1)
    assert shifted.value > 5 * shifted.stderr


def test_kid_is_unbiased_in_expectation_and_its_stderr_conservative_there():
    """Over 200 draws of small samples from one distribution the mean KID is 0 within its s.e.
    (a plug-in MMD^2 keeping the diagonal would be clearly positive).  There MMD^2 is a degenerate
    U-statistic and the jackknife about doubles its variance: s.e. 1.4x the spread of the draws."""
    draws = kid_draws(0.0, 4)
    values = np.array([e.value for e in draws])
    assert abs(values.mean()) < 3 * values.std(ddof=1) / np.sqrt(len(values))
    assert 1.1 < np.mean([e.stderr for e in draws]) / values.std(ddof=1) < 1.7


def test_kid_stderr_matches_the_spread_of_independent_draws():
    """Gaussians with different means: the mean reported s.e. against the standard deviation of KID
    over 200 independent draws, and each draw's s.e. steady (a jackknife over 20 groups; the s.e.
    of 4 disjoint subsets varied by 45 % from draw to draw here)."""
    draws = kid_draws(0.3, 5)
    values = np.array([e.value for e in draws])
    stderrs = np.array([e.stderr for e in draws])
    assert values.mean() > 20 * values.std(ddof=1) / np.sqrt(len(values))  # clearly not equal
    assert 0.8 < stderrs.mean() / values.std(ddof=1) < 1.25
    assert stderrs.std(ddof=1) / stderrs.mean() < 0.3


def test_kid_refuses_too_few_samples_for_its_jackknife():
    x = torch.randn(30, 4)
    with pytest.raises(
        MetricInputError, match="KID's jackknife needs at least 40 samples on each side, got 30"
    ):
        kernel_distance(x, torch.randn(300, 4))


def test_knn_radii_match_a_sorted_distance_matrix():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    distances = torch.cdist(x, x).fill_diagonal_(float("inf"))
    truth = distances.sort(1).values[:, 2] ** 2
    assert torch.allclose(knn_radii(x, 3), truth, rtol=1e-9)


def test_precision_recall_of_a_set_against_itself_is_one_and_against_a_far_cluster_zero():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(500, 8, generator=g)
    precision, recall = precision_recall(x, x.clone())
    assert (precision.value, recall.value) == (1.0, 1.0)
    far = torch.randn(500, 8, generator=g) + 50.0
    precision, recall = precision_recall(x, far)
    assert (precision.value, recall.value, precision.stderr, recall.stderr) == (0.0, 0.0, 0.0, 0.0)


def brute_force_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    def radii(x):
        return torch.cdist(x, x).fill_diagonal_(float("inf")).sort(1).values[:, k - 1]

    precision = (torch.cdist(fake, real) <= radii(real)[None, :]).any(1).double().mean()
    recall = (torch.cdist(real, fake) <= radii(fake)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def test_precision_counts_the_generated_points_inside_the_real_manifold():
    """Half the generated points on the real set, half far away: precision 1/2; the real points
    all lie in the generated manifold (which contains them), recall 1."""
    g = torch.Generator().manual_seed(7)
    real = torch.randn(400, 4, generator=g)
    fake = torch.cat([real[:200] + 1e-3, torch.randn(200, 4, generator=g) + 40.0])
    fake_on_real = torch.cat([real, real[:200]])  # every real point, plus repeats
    precision, _ = precision_recall(real, fake)
    assert precision.value == 0.5
    assert precision.n == 400
    _, recall = precision_recall(real, fake_on_real)
    assert recall.value == 1.0 and recall.n == 400


def test_precision_recall_of_overlapping_gaussians_match_a_brute_force_count(monkeypatch):
    """Two overlapping Gaussians (shifted mean, narrower spread): precision and recall strictly
    between 0 and 1, each exactly the fraction a cdist count with 3rd-neighbour radii gives,
    whether the distances are computed in blocks of 97 rows or in one."""
    g = torch.Generator().manual_seed(12)
    real = torch.randn(600, 4, generator=g)
    fake = 0.8 * torch.randn(500, 4, generator=g) + torch.tensor([2.0, 0.0, -0.4, 0.0])
    truth = brute_force_precision_recall(real.double(), fake.double(), k=3)
    assert 0.2 < truth[0] < 0.9 and 0.2 < truth[1] < 0.9
    whole = precision_recall(real, fake, k=3)
    monkeypatch.setattr(feature_metrics, "_ROWS_PER_BLOCK", 97)
    blocked = precision_recall(real, fake, k=3)
    for precision, recall in (whole, blocked):
        assert (precision.value, recall.value) == pytest.approx(truth, abs=1e-12)


def test_precision_recall_stderr_is_the_spread_over_disjoint_parts():
    """Values against a cdist reference; s.e. = sd / sqrt(10) of the values of the 10 disjoint
    random parts of both sets, each part's manifolds built from that part alone."""
    g = torch.Generator().manual_seed(10)
    real, fake = torch.randn(300, 5, generator=g), 1.3 * torch.randn(240, 5, generator=g) + 0.2
    precision, recall = precision_recall(real, fake, seed=4)
    assert (precision.value, recall.value) == pytest.approx(
        brute_force_precision_recall(real, fake), abs=1e-12
    )
    assert precision_recall_values(real, fake) == pytest.approx(brute_force_precision_recall(real, fake))
    real_parts, fake_parts = random_groups(300, 240, 10, 4)
    assert (
        torch.bincount(real_parts).tolist() == [30] * 10 and torch.bincount(fake_parts).tolist() == [24] * 10
    )
    parts = np.array(
        [brute_force_precision_recall(real[real_parts == i], fake[fake_parts == i]) for i in range(10)]
    )
    assert (precision.stderr, recall.stderr) == pytest.approx(tuple(parts.std(0, ddof=1) / np.sqrt(10)))
    assert (precision.n, recall.n) == (240, 300)


def test_precision_recall_stderr_matches_the_spread_of_independent_draws():
    """30 draws of 1000 real Gaussian points and 1000 from a heavy-tailed generator (a Gaussian over
    a random scale): the few far generated points carry large k-NN balls, so the generated
    manifold, redrawn with every sample, dominates recall's spread; a binomial s.e. given the
    manifold is 0.4x that spread here."""
    g = torch.Generator().manual_seed(0)
    draws = []
    for seed in range(30):
        real = torch.randn(1000, 8, generator=g)
        fake = 0.3 * torch.randn(1000, 8, generator=g) / torch.rand(1000, 1, generator=g).sqrt()
        draws.append(precision_recall(real, fake, seed=seed))
    for metric in range(2):
        values = np.array([d[metric].value for d in draws])
        stderr = np.mean([d[metric].stderr for d in draws])
        assert 0.7 < stderr / values.std(ddof=1) < 1.5


def test_score_features_refuses_too_few_samples_naming_the_minimum():
    x = torch.randn(MIN_SAMPLES - 1, 16)
    with pytest.raises(MetricInputError, match=f"at least {MIN_SAMPLES} samples on each side"):
        score_features(x, torch.randn(500, 16))
    with pytest.raises(MetricInputError, match="at least 301 samples"):  # more rows than dimensions
        score_features(torch.randn(250, 300), torch.randn(250, 300))
    assert MetricInputError in USAGE_ERRORS  # the CLI turns it into one line and exit 2


def test_score_features_returns_every_metric_with_its_sample_count():
    g = torch.Generator().manual_seed(8)
    scores = score_features(torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g))
    assert set(scores) == {"fd", "kid", "precision", "recall"}
    assert all(isinstance(s, Estimate) and s.n == 400 and s.stderr > 0 for s in scores.values())


def test_estimate_renders_value_and_stderr():
    e = Estimate(12.3456, 0.4321, 1000)
    assert str(e) == "12.35 ± 0.43"
    assert e.to_dict() == {"value": 12.3456, "stderr": 0.4321, "n": 1000}


def test_class_fidelity_is_the_accuracy_on_the_requested_classes():
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 0]), 3).float()
    fidelity = class_fidelity(logits, labels)
    assert (fidelity.value, fidelity.n) == (5 / 8, 8)
    assert fidelity.stderr == pytest.approx(np.sqrt(5 / 8 * 3 / 8 / 8))


def test_per_class_fd_scores_each_class_against_its_own_real_samples():
    """Class 1's generated samples are shifted by 2 along one axis: FD about 4 there, about 0
    for class 0 (the real classes sit far apart, so pooling them would hide this)."""
    g = torch.Generator().manual_seed(9)
    labels = torch.arange(4000) % 2
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    real = centres[labels] + torch.randn(4000, 2, generator=g, dtype=torch.float64)
    fake = centres[labels] + torch.randn(4000, 2, generator=g, dtype=torch.float64)
    fake[labels == 1, 1] += 2.0
    scores = per_class_fd(real, labels, fake, labels)
    assert abs(scores[0].value) < 4 * scores[0].stderr + 0.01
    assert abs(scores[1].value - 4.0) < 4 * scores[1].stderr
    with pytest.raises(MetricInputError, match="at least 40 samples of each class .* class 0 has 35 real"):
        per_class_fd(real[:70], labels[:70], fake, labels)
