"""FD, KID and precision/recall on feature rows: closed forms, brute-force references, and standard
errors checked against the spread of repeated draws."""

import itertools

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from zoo.errors import MetricInputError
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
    unbiased_mmd2,
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


def test_unbiased_mmd2_matches_a_pairwise_sum():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    truth = within / (m * (m - 1)) - 2 * across / m**2
    assert unbiased_mmd2(x, y) == pytest.approx(truth, rel=1e-12)


def test_kid_of_one_distribution_is_zero_within_its_stderr():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(4000, 16, generator=g).relu(), torch.randn(4000, 16, generator=g).relu()
    kid = kernel_distance(real, fake)
    assert kid.n == 4000  # 4 disjoint subsets of 1000
    assert abs(kid.value) < 3 * kid.stderr
    shifted = kernel_distance(real, fake + 0.1)
    assert shifted.value > 5 * shifted.stderr


def test_kid_is_unbiased_in_expectation_and_its_stderr_is_calibrated():
    """Over 200 draws of small samples from one distribution the mean KID is 0 within its s.e.
    (a plug-in MMD^2 keeping the diagonal would be clearly positive), and the reported s.e.
    matches the spread of the draws."""
    g = torch.Generator().manual_seed(4)
    draws = [
        kernel_distance(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g))
        for _ in range(200)
    ]
    values = np.array([e.value for e in draws])
    assert abs(values.mean()) < 3 * values.std(ddof=1) / np.sqrt(len(values))
    assert 0.7 < np.mean([e.stderr for e in draws]) / values.std(ddof=1) < 1.4


def test_kid_refuses_subsets_that_do_not_fit():
    x = torch.randn(300, 4)
    with pytest.raises(MetricInputError, match="KID needs 3 disjoint subsets of 200"):
        kernel_distance(x, x, subsets=3, subset_size=200)


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
