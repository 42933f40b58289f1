"""PNG figures for runs: sample grids, 2-D scatter plots, loss curves, metric bars.

Matplotlib's object API with an explicit Agg canvas: no pyplot, no global backend switch, no
figures left open, safe in threads and on headless machines.  Every file is written to a
temporary name in the same folder and renamed, so a reader never sees half a PNG.  Each function
returns the picture as a uint8 (H, W, 3) array, ready for `trackio.Image`.
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image
from torch import Tensor

SAMPLE_COLOUR = "tab:orange"
REFERENCE_COLOUR = "tab:blue"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _save_png(array: np.ndarray, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    Image.fromarray(array).save(temporary, format="PNG")
    temporary.replace(path)


def _save_figure(figure: Figure, path: Path) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    array = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    _save_png(array, path)
    return array


def image_grid(x: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] (C = 1 or 3) tiled into one uint8 (H', W', 3) array,
    `nrow` images per row (default: a square-ish grid)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    n, channels, height, width = x.shape
    columns = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pixels = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.expand(-1, 3, -1, -1) if channels == 1 else pixels
    grid = torch.zeros(
        3, rows * (height + padding) + padding, columns * (width + padding) + padding, dtype=torch.uint8
    )
    for k in range(n):
        top = padding + (k // columns) * (height + padding)
        left = padding + (k % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = pixels[k]
    return grid.permute(1, 2, 0).numpy()


# Small images (8x8 digits) make a grid of a few dozen pixels: it is enlarged, by whole pixels
# (nearest neighbour, so every pixel stays visible as it is), until it is at least this wide.
MIN_GRID_WIDTH = 256


def upscale(grid: np.ndarray, min_width: int) -> np.ndarray:
    """`grid` (H, W, 3) repeated k x k per pixel, k the least integer making it `min_width` wide."""
    factor = max(1, math.ceil(min_width / grid.shape[1]))
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def save_image_grid(
    x: Tensor, path: Path, nrow: int | None = None, min_width: int = MIN_GRID_WIDTH
) -> np.ndarray:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid, enlarged to at least `min_width`
    pixels wide (see MIN_GRID_WIDTH); return the grid as written, (H', W', 3) uint8."""
    grid = upscale(image_grid(x, nrow), min_width)
    _save_png(grid, Path(path))
    return grid


def save_scatter(
    samples: Tensor,
    path: Path,
    reference: Tensor | None = None,
    title: str | None = None,
    limit: float | None = None,
) -> np.ndarray:
    """Scatter 2-D samples (N, 2) over reference points (held-out data) in another colour.

    The axes are square and symmetric, [-limit, limit]; by default wide enough for 99.5% of the
    reference points (or the samples), so a few far-off samples cannot squash the picture.
    """
    samples = samples.detach().float().cpu()
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"expected 2-D points (N, 2), got shape {tuple(samples.shape)}")
    figure = Figure(figsize=(5, 5), dpi=100)
    axes = figure.add_subplot()
    base = samples
    if reference is not None:
        reference = reference.detach().float().cpu()
        axes.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.4, c=REFERENCE_COLOUR, label="data")
        base = reference
    axes.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.6, c=SAMPLE_COLOUR, label="samples")
    if limit is None:
        limit = float(torch.quantile(base.abs().max(1).values, 0.995)) * 1.15
    axes.set_xlim(-limit, limit)
    axes.set_ylim(-limit, limit)
    axes.set_aspect("equal")
    axes.legend(loc="upper right", markerscale=4)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return _save_figure(figure, Path(path))


def save_loss_curve(
    steps: Sequence[int], losses: Sequence[float], path: Path, title: str = "training loss"
) -> np.ndarray:
    """Loss against step, raw and smoothed (exponential moving average); log scale when all > 0."""
    if len(steps) != len(losses) or len(steps) == 0:
        raise ValueError(
            f"need equally many steps and losses (at least one), got {len(steps)} and {len(losses)}"
        )
    values = np.asarray(losses, dtype=np.float64)
    smoothed = np.empty_like(values)
    average = values[0]
    # A memory of a tenth of the curve, at most 20 points: short curves still show their trend.
    decay = min(0.95, 1 - 1 / max(2, len(values) // 10))
    for k, value in enumerate(values):
        average = decay * average + (1 - decay) * value
        smoothed[k] = average
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, values, alpha=0.3, color=REFERENCE_COLOUR, label="loss")
    axes.plot(steps, smoothed, color=REFERENCE_COLOUR, label="smoothed")
    if np.all(values > 0):
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return _save_figure(figure, Path(path))


def save_metric_bars(
    names: Sequence[str],
    values: Sequence[float],
    errors: Sequence[float],
    path: Path,
    ylabel: str = "energy distance",
    title: str | None = None,
    floor: float | None = None,
) -> np.ndarray:
    """Bars with ±1 standard-error whiskers (e.g. energy distance per sampler and NFE); `floor`
    draws the data-vs-data noise floor as a dashed line."""
    if not len(names) == len(values) == len(errors):
        raise ValueError(f"got {len(names)} names, {len(values)} values and {len(errors)} errors")
    figure = Figure(figsize=(max(4.0, 0.7 * len(names) + 2), 4), dpi=100)
    axes = figure.add_subplot()
    positions = np.arange(len(names))
    axes.bar(positions, values, yerr=errors, capsize=4, color=REFERENCE_COLOUR, alpha=0.8)
    axes.set_xticks(positions, list(names), rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    if floor is not None:
        axes.axhline(floor, color="black", linestyle="--", linewidth=1, label="data vs data")
        axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return _save_figure(figure, Path(path))


def save_quality_vs_nfe(
    curves: Sequence[tuple[str, Sequence[int], Sequence[float], Sequence[float]]],
    path: Path,
    ylabel: str,
    title: str | None = None,
    floor: tuple[float, float] | None = None,
) -> np.ndarray:
    """Quality against network evaluations per sample: one line with ±1 s.e. error bars per
    (label, nfes, values, errors) curve, on a log NFE axis; `floor` (value, s.e.) is the
    data-vs-data row, drawn as a dashed line inside a band of ±1 s.e."""
    if not curves:
        raise ValueError("no curves to plot")
    figure = Figure(figsize=(6.5, 4.5), dpi=100)
    axes = figure.add_subplot()
    for label, nfes, values, errors in curves:
        if not len(nfes) == len(values) == len(errors):
            raise ValueError(f"{label}: got {len(nfes)} NFEs, {len(values)} values and {len(errors)} errors")
        order = np.argsort(nfes)
        axes.errorbar(
            np.asarray(nfes)[order],
            np.asarray(values)[order],
            yerr=np.asarray(errors)[order],
            marker="o",
            capsize=3,
            label=label,
        )
    if floor is not None:
        value, stderr = floor
        axes.axhline(value, color="black", linestyle="--", linewidth=1, label="data vs data")
        axes.axhspan(value - stderr, value + stderr, color="black", alpha=0.08)
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 1, 2, 4, not 2^0
    axes.set_xlabel("network evaluations per sample (NFE)")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize="small")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return _save_figure(figure, Path(path))
