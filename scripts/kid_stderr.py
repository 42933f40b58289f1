"""KID's standard error: the whole-set value with its delete-a-group jackknife s.e. (zoo's KID)
against the mean over disjoint subsets with s.e. = sd / sqrt(subsets), each checked against the
spread of KID over independent draws.

    PYTHONPATH=. .venv/bin/python scripts/kid_stderr.py [--draws 200] [--n 1000] [--threads 1]

Gaussians: `--draws` independent pairs of n 16-D standard Gaussians, equal or with the second
mean shifted by 0.1 along every axis.  Fashion-MNIST: features of a small feature net (3000
training images, 2 epochs, trained here into a temporary cache) of n training images against n
test images, unchanged (the floor) and with Gaussian noise of sigma 0.3, over disjoint draws.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from zoo.config.schema import DataConfig
from zoo.data import build_data
from zoo.metrics.feature_metrics import Estimate, kernel_distance
from zoo.metrics.features import FeatureNetConfig, load_feature_net

SMALL_NET = FeatureNetConfig(widths=(8, 16), hidden=32, epochs=2, train_size=3000, min_accuracy=0.7)


def subsets_kid(real: torch.Tensor, fake: torch.Tensor, subsets: int, seed: int) -> Estimate:
    """The mean of KID over `subsets` disjoint random subsets of each set, s.e. sd / sqrt(subsets)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(len(real), len(fake)) // subsets
    real_order = torch.randperm(len(real), generator=generator)[: subsets * size].view(subsets, size)
    fake_order = torch.randperm(len(fake), generator=generator)[: subsets * size].view(subsets, size)
    # A subset's KID value is its whole-set unbiased MMD^2, whatever the jackknife's groups.
    values = np.array(
        [
            kernel_distance(real[r], fake[f], groups=2).value
            for r, f in zip(real_order, fake_order, strict=True)
        ]
    )
    return Estimate(float(values.mean()), float(values.std(ddof=1) / np.sqrt(subsets)), subsets * size)


def summary(name: str, draws: list[Estimate]) -> str:
    values = np.array([d.value for d in draws])
    stderrs = np.array([d.stderr for d in draws])
    spread = values.std(ddof=1)
    return (
        f"  {name:<28} mean {values.mean():+.4g}  spread {spread:.3g}  mean s.e. {stderrs.mean():.3g} "
        f"({stderrs.mean() / spread:.2f}x spread)  s.e. varies ±{stderrs.std(ddof=1) / stderrs.mean():.0%}"
    )


def compare(title: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    print(f"{title} ({len(pairs)} draws, n = {len(pairs[0][1])})")
    jackknife = [kernel_distance(real, fake, seed=seed) for seed, (real, fake) in enumerate(pairs)]
    subsets = [subsets_kid(real, fake, 4, seed) for seed, (real, fake) in enumerate(pairs)]
    print(f"  first draw: whole set + jackknife {jackknife[0]}, 4 disjoint subsets {subsets[0]}")
    print(summary("whole set + jackknife(20)", jackknife))
    print(summary("mean of 4 disjoint subsets", subsets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200, help="independent Gaussian draws")
    parser.add_argument("--n", type=int, default=1000, help="samples per side")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    for shift in (0.0, 0.1):
        pairs = [
            (torch.randn(args.n, 16, generator=g), torch.randn(args.n, 16, generator=g) + shift)
            for _ in range(args.draws)
        ]
        compare(f"Gaussians, mean shift {shift}", pairs)

    data = DataConfig(name="fashion-mnist", root=args.data_dir)
    with tempfile.TemporaryDirectory() as cache:
        net = load_feature_net(data, SMALL_NET, cache_dir=Path(cache))
    print(f"Fashion-MNIST feature net: {net.dim}-D, test accuracy {net.test_accuracy:.2%}")
    source = build_data(data, "cpu", 0, 1)
    train, test = source.reference(60_000), source.held_out(10_000)
    draws = len(test) // args.n
    noise = torch.Generator().manual_seed(1)
    for sigma in (0.0, 0.3):
        pairs = []
        for i in range(draws):
            images = test[i * args.n : (i + 1) * args.n]
            noisy = (images + sigma * torch.randn(images.shape, generator=noise)).clamp(-1, 1)
            pairs.append((net.features(train[i * args.n : (i + 1) * args.n]), net.features(noisy)))
        compare(f"Fashion-MNIST train vs test, noise {sigma}", pairs)


if __name__ == "__main__":
    main()
