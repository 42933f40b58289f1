"""Validation of the feature-space metrics on real Fashion-MNIST: a sanity ladder, the feature nets'
accuracy, and the time to score 10 000 images.

    PYTHONPATH=. .venv/bin/python scripts/metrics_ladder.py [--n 10000] [--time-n 10000] [--data-dir data]

From nothing: the feature nets of Fashion-MNIST and digits are trained if the cache
($ZOO_CACHE_DIR/feature-nets) has none.  The ladder compares n real training images (a fixed
subset) with n test images: unchanged (the real-vs-real floor), with Gaussian noise of
sigma = 0.05 ... 0.4 (in the model space [-1, 1], clamped back into it), and Gaussian blur of
increasing radius (the kernel's sigma in pixels).  FD and KID should rise and precision fall
along each corruption.  Writes ladder.json, ladder.png and log.txt to --out.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from zoo.config.schema import DataConfig
from zoo.data import build_data
from zoo.metrics.feature_metrics import score_features
from zoo.metrics.features import load_feature_net

NOISE = (0.05, 0.1, 0.2, 0.4)
BLUR = (0.5, 1.0, 1.5, 2.0)
METRICS = ("fd", "kid", "precision", "recall")


class Tee:
    """stdout to the terminal and to the run's log."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w")
        self.stdout = sys.stdout

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.file.write(text)

    def flush(self) -> None:
        self.stdout.flush()
        self.file.flush()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def on_step_printer(name: str):
    def on_step(step: int, steps: int, loss: float) -> None:
        if step % 200 == 0 or step == steps:
            print(f"  training {name}'s feature net: step {step}/{steps}, loss {loss:.3f}", flush=True)

    return on_step


def monotone(values: list[float], rising: bool) -> bool:
    return all((b > a) if rising else (b < a) for a, b in zip(values, values[1:], strict=False))


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    floor = results["floor"]
    for axis, metric in zip(figure.subplots(1, 4), METRICS, strict=True):
        for family, levels, colour in (("noise", NOISE, "tab:red"), ("blur", BLUR, "tab:blue")):
            rungs = [results[f"{family} {level}"][metric] for level in levels]
            axis.errorbar(
                range(1, len(levels) + 1),
                [r["value"] for r in rungs],
                yerr=[r["stderr"] for r in rungs],
                marker="o",
                capsize=3,
                color=colour,
                label=f"{family}: " + ", ".join(str(level) for level in levels),
            )
        axis.axhline(floor[metric]["value"], color="black", linestyle="--", label="train vs test (floor)")
        axis.axhspan(
            floor[metric]["value"] - floor[metric]["stderr"],
            floor[metric]["value"] + floor[metric]["stderr"],
            color="black",
            alpha=0.1,
        )
        axis.set_title(metric.upper() if metric in ("fd", "kid") else metric)
        axis.set_xlabel("corruption level (rung)")
        if metric == "fd":
            axis.set_yscale("log")
    axis.legend(fontsize=7)
    figure.suptitle(f"Fashion-MNIST sanity ladder, n = {floor['fd']['n']} per side (± 1 s.e.)")
    FigureCanvasAgg(figure).print_png(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="images per side on the ladder")
    parser.add_argument("--time-n", type=int, default=10_000, help="images per side for the timing")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=Path("outputs/metrics-ladder"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(args.out / "log.txt")
    torch.set_num_threads(args.threads)
    print(f"config: {vars(args)} noise={NOISE} blur={BLUR}")

    nets = {}
    for name in ("digits", "fashion-mnist"):
        data = DataConfig(name=name, root=args.data_dir)
        net = load_feature_net(data, on_step=on_step_printer(name))
        nets[name] = net
        print(
            f"{name}: test accuracy {net.test_accuracy:.2%} (floor {net.config.min_accuracy:.0%}), "
            f"trained in {net.train_seconds:.0f} s, {net.dim}-D features, sha256 {net.sha256[:16]}"
        )
    net = nets["fashion-mnist"]

    source = build_data(DataConfig(name="fashion-mnist", root=args.data_dir), "cpu", 0, 256)
    timed_real, timed_test = source.reference(args.time_n), source.held_out(args.time_n)
    start, cpu_start = time.perf_counter(), time.process_time()
    score_features(net.features(timed_real), net.features(timed_test))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(
        f"time to score {len(timed_real)} vs {len(timed_test)} images (features of both, all metrics): "
        f"{seconds:.1f} s wall, {cpu_seconds:.1f} s CPU"
    )
    real_images, test_images = source.reference(args.n), source.held_out(args.n)
    real = net.features(real_images)
    floor = score_features(real, net.features(test_images))

    generator = torch.Generator().manual_seed(0)
    rungs = {"floor": test_images}
    for sigma in NOISE:
        noise = torch.randn(test_images.shape, generator=generator)
        rungs[f"noise {sigma}"] = (test_images + sigma * noise).clamp(-1, 1)
    for sigma in BLUR:
        rungs[f"blur {sigma}"] = gaussian_blur(test_images, sigma)
    results = {"floor": {k: v.to_dict() for k, v in floor.items()}}
    print(f"{'rung':>10} " + " ".join(f"{m:>22}" for m in METRICS))
    for name, images in rungs.items():
        scores = floor if name == "floor" else score_features(real, net.features(images))
        results[name] = {k: v.to_dict() for k, v in scores.items()}
        print(f"{name:>10} " + " ".join(f"{str(scores[m]):>22}" for m in METRICS), flush=True)

    checks = {}
    for family, levels in (("noise", NOISE), ("blur", BLUR)):
        names = ["floor", *(f"{family} {level}" for level in levels)]
        for metric, rising in (("fd", True), ("kid", True), ("precision", False)):
            checks[f"{metric} {'rises' if rising else 'falls'} with {family}"] = monotone(
                [results[n][metric]["value"] for n in names], rising
            )
    for check, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}")

    summary = {
        "n": args.n,
        "feature_nets": {
            name: {
                "test_accuracy": n.test_accuracy,
                "floor": n.config.min_accuracy,
                "train_seconds": n.train_seconds,
                "sha256": n.sha256,
                "config": n.config.to_dict(),
            }
            for name, n in nets.items()
        },
        "timing": {"n": args.time_n, "wall_seconds": seconds, "cpu_seconds": cpu_seconds},
        "ladder": results,
        "checks": checks,
    }
    (args.out / "ladder.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, args.out / "ladder.png")
    print(f"wrote {args.out / 'ladder.json'}, {args.out / 'ladder.png'}, {args.out / 'log.txt'}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
