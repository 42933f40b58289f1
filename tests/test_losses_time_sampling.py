import math

import pytest
import torch

from zoo.config.schema import LossConfig
from zoo.losses.time_sampling import LogitNormalSampler, UniformSampler, jvp_count, sample_t_r


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logit(t: torch.Tensor) -> torch.Tensor:
    return torch.log(t) - torch.log1p(-t)


@pytest.mark.parametrize("batch", [1, 7, 8, 64, 129])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_exact_count_of_r_not_t_and_r_le_t(batch: int, ratio: float) -> None:
    cfg = LossConfig(ratio=ratio)
    gen = generator()
    for _ in range(3):
        times = sample_t_r(batch, cfg, gen)
        assert times.t.shape == times.r.shape == times.mask.shape == (batch,)
        assert int(times.mask.sum()) == round(ratio * batch) == times.n_jvp
        assert bool((times.r <= times.t).all())
        # Outside the mask r equals t exactly; inside it is the smaller of two continuous draws.
        assert torch.equal(times.r[~times.mask], times.t[~times.mask])
        assert bool((times.r[times.mask] < times.t[times.mask]).all())
        # The index tensors partition the batch and agree with the mask.
        assert sorted(torch.cat([times.jvp_index, times.flow_index]).tolist()) == list(range(batch))
        assert bool(times.mask[times.jvp_index].all()) and not bool(times.mask[times.flow_index].any())
        assert bool(((times.t > 0) & (times.t < 1)).all())


def test_masked_positions_vary_between_draws() -> None:
    gen = generator()
    cfg = LossConfig(ratio=0.5)
    masks = {tuple(sample_t_r(16, cfg, gen).mask.tolist()) for _ in range(10)}
    assert len(masks) > 5


def test_jvp_count_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError, match="ratio"):
        jvp_count(8, 1.5)


def test_logit_normal_moments_match_parameters() -> None:
    mu, sigma, n = -0.4, 1.3, 200_000
    x = logit(LogitNormalSampler(mu, sigma).sample(n, generator(), dtype=torch.float64))
    se_mean = sigma / math.sqrt(n)
    assert abs(x.mean().item() - mu) < 4 * se_mean
    # SE of the sample std of a normal is sigma / sqrt(2n).
    assert abs(x.std().item() - sigma) < 4 * sigma / math.sqrt(2 * n)


def test_t_is_max_and_r_is_min_of_two_logit_normals() -> None:
    # logit is monotone, so logit(t) = max of two N(mu, sigma^2): mean mu + sigma / sqrt(pi).
    mu, sigma, n = -2.0, 2.0, 100_000
    cfg = LossConfig(time_mu=mu, time_sigma=sigma, ratio=1.0)
    times = sample_t_r(n, cfg, generator(1), dtype=torch.float64)
    lt, lr = logit(times.t), logit(times.r)
    shift = sigma / math.sqrt(math.pi)
    se = sigma / math.sqrt(n)  # max/min of two normals has std < sigma; this bound is conservative
    assert abs(lt.mean().item() - (mu + shift)) < 4 * se
    assert abs(lr.mean().item() - (mu - shift)) < 4 * se


def test_uniform_sampler_and_its_max_min() -> None:
    n = 100_000
    u = UniformSampler().sample(n, generator(), dtype=torch.float64)
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    times = sample_t_r(n, LossConfig(time_sampler="uniform", ratio=1.0), generator(2), dtype=torch.float64)
    # max / min of two U(0,1): means 2/3 and 1/3, variances 1/18.
    assert abs(times.t.mean().item() - 2 / 3) < 4 * math.sqrt(1 / 18 / n)
    assert abs(times.r.mean().item() - 1 / 3) < 4 * math.sqrt(1 / 18 / n)


def test_same_seed_same_draws_and_generator_device() -> None:
    cfg = LossConfig(ratio=0.5)
    a, b = sample_t_r(32, cfg, generator(5)), sample_t_r(32, cfg, generator(5))
    assert torch.equal(a.t, b.t) and torch.equal(a.r, b.r) and torch.equal(a.mask, b.mask)
    assert a.t.device == torch.device("cpu")
