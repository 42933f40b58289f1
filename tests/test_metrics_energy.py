"""Energy distance: against a brute-force reference, a closed form, and its own error bars."""

import math

import pytest
import torch

from zoo.metrics.energy import energy_distance


def brute_force(x: torch.Tensor, y: torch.Tensor) -> float:
    """Full float64 distance matrices; within-sample means over i != j."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    n, m = len(x), len(y)
    xx = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(0)
    yy = torch.cdist(y, y, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(0)
    xy = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    return float(2 * xy.mean() - xx.sum() / (n * (n - 1)) - yy.sum() / (m * (m - 1)))


def jackknife_by_recomputation(x: torch.Tensor, y: torch.Tensor) -> float:
    """The two-sample jackknife, recomputing the estimate with each sample left out."""
    n, m = len(x), len(y)
    dx = torch.tensor([brute_force(torch.cat([x[:k], x[k + 1 :]]), y) for k in range(n)], dtype=torch.float64)
    dy = torch.tensor([brute_force(x, torch.cat([y[:k], y[k + 1 :]])) for k in range(m)], dtype=torch.float64)
    variance = (n - 1) / n * (dx - dx.mean()).square().sum() + (m - 1) / m * (dy - dy.mean()).square().sum()
    return float(variance.sqrt())


def normal_abs_mean(mean: float, std: float) -> float:
    """E|Z| for Z ~ N(mean, std^2) (the folded normal)."""
    phi = 0.5 * (1 + math.erf(-mean / std / math.sqrt(2)))
    return std * math.sqrt(2 / math.pi) * math.exp(-(mean**2) / (2 * std**2)) + mean * (1 - 2 * phi)


def test_matches_brute_force_and_explicit_jackknife():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 3, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randn(17, 3, 2, 2, generator=g, dtype=torch.float64) * 1.3 + 0.2
    result = energy_distance(x, y, chunk_size=8)  # blocks cut across both samples unevenly
    assert result.value == pytest.approx(brute_force(x, y), rel=1e-10, abs=1e-12)
    assert result.stderr == pytest.approx(jackknife_by_recomputation(x, y), rel=1e-8)
    assert (result.n_x, result.n_y) == (23, 17)


def test_chunk_size_and_input_dtype_do_not_change_the_value():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 7, generator=g), torch.randn(45, 7, generator=g) + 0.5
    reference = energy_distance(x, y, chunk_size=1024)
    for chunk in (1, 6, 50):
        result = energy_distance(x, y, chunk_size=chunk)
        assert result.value == pytest.approx(reference.value, rel=1e-12)
        assert result.stderr == pytest.approx(reference.stderr, rel=1e-10)
    assert energy_distance(x.double(), y.double()).value == pytest.approx(reference.value, rel=1e-12)


def test_same_distribution_is_zero_and_shifted_is_positive():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(800, 10, generator=g), torch.randn(800, 10, generator=g)
    same = energy_distance(x, y)
    assert abs(same.value) < 2 * same.stderr
    shifted = energy_distance(x, y + 0.3)
    assert shifted.value > 5 * shifted.stderr


def test_closed_form_for_two_normals():
    """N(0, 1) vs N(mu, 1): D^2 = 2 E|X - Y| - 2 E|X - X'| with X - Y ~ N(-mu, 2), X - X' ~ N(0, 2)."""
    mu = 1.0
    truth = 2 * normal_abs_mean(mu, math.sqrt(2)) - 2 * normal_abs_mean(0.0, math.sqrt(2))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 1, generator=g, dtype=torch.float64)
    y = torch.randn(3000, 1, generator=g, dtype=torch.float64) + mu
    result = energy_distance(x, y)
    assert abs(result.value - truth) < 3 * result.stderr
    assert result.stderr < 0.1 * truth  # the comparison is sharp, not vacuous


def test_jackknife_error_matches_the_spread_over_repeated_draws():
    g = torch.Generator().manual_seed(4)
    values, errors = [], []
    for _ in range(150):
        x = torch.randn(150, 2, generator=g, dtype=torch.float64)
        y = torch.randn(150, 2, generator=g, dtype=torch.float64) + torch.tensor(
            [0.5, 0.0], dtype=torch.float64
        )
        result = energy_distance(x, y)
        values.append(result.value)
        errors.append(result.stderr)
    spread = torch.tensor(values).std()
    typical_error = torch.tensor(errors).square().mean().sqrt()
    assert 0.7 < typical_error / spread < 1.3


def test_two_evaluations_in_image_dimensions_agree_within_error_bars():
    """In 3072-D the biased estimator lets two evaluations of the same pair of distributions differ
    tenfold.  With the unbiased estimator they agree within their standard errors."""
    g = torch.Generator().manual_seed(5)
    results = []
    for _ in range(2):
        data = torch.randn(400, 3, 32, 32, generator=g)
        model = torch.randn(400, 3, 32, 32, generator=g) * 1.05 + 0.05
        results.append(energy_distance(data, model))
    a, b = results
    assert a.value > 5 * a.stderr and b.value > 5 * b.stderr
    assert abs(a.value - b.value) < 3 * math.hypot(a.stderr, b.stderr)
    assert max(a.value, b.value) / min(a.value, b.value) < 1.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 3"):
        energy_distance(torch.randn(2, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="differ in size"):
        energy_distance(torch.randn(10, 4), torch.randn(10, 5))
