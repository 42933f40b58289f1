"""Plots: valid PNGs of the expected size whose pixels are what the functions return."""

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.plotting import image_grid, save_image_grid, save_loss_curve, save_metric_bars, save_scatter


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_image_grid_layout_and_values(tmp_path):
    x = torch.full((10, 3, 8, 8), -1.0)
    x[3] = 1.0  # one white image: 4th of the first row
    x[7, 0] = 0.0  # one with a mid-grey red channel
    grid = save_image_grid(x, tmp_path / "grid.png", nrow=5, min_width=0)
    assert grid.shape == (2 * (8 + 2) + 2, 5 * (8 + 2) + 2, 3) and grid.dtype == np.uint8
    assert np.array_equal(read_png(tmp_path / "grid.png"), grid)
    top, left = 2, 2 + 3 * 10
    assert (grid[top : top + 8, left : left + 8] == 255).all()
    top, left = 2 + 10, 2 + 2 * 10
    tile = grid[top : top + 8, left : left + 8]
    assert (tile[..., 0] == 128).all() and (tile[..., 1] == 0).all()
    assert list(tmp_path.iterdir()) == [tmp_path / "grid.png"]  # no temporary file left


def test_grayscale_grid_and_default_square_layout(tmp_path):
    x = torch.linspace(-1, 1, 9 * 28 * 28).view(9, 1, 28, 28)
    grid = save_image_grid(x, tmp_path / "sub" / "g.png", min_width=0)
    assert grid.shape == (3 * 30 + 2, 3 * 30 + 2, 3)
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()
    with Image.open(tmp_path / "sub" / "g.png") as image:
        assert image.size == (92, 92)


def test_small_images_are_enlarged_by_whole_pixels(tmp_path):
    # 16 digits of 8x8: a 42-pixel grid, written 7x larger (the least factor reaching 256 px).
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    small = image_grid(x)
    assert small.shape == (42, 42, 3)
    grid = save_image_grid(x, tmp_path / "digits.png")
    png = read_png(tmp_path / "digits.png")
    assert png.shape == (294, 294, 3) and np.array_equal(png, grid)
    # nearest neighbour: each source pixel becomes a 7x7 block of exactly its value
    assert np.array_equal(png, small.repeat(7, axis=0).repeat(7, axis=1))
    # a grid already wide enough is written as it is
    large = save_image_grid(torch.zeros(4, 3, 128, 128), tmp_path / "large.png")
    assert large.shape == (2 * 130 + 2, 2 * 130 + 2, 3)


def test_values_outside_range_are_clipped():
    grid = image_grid(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2), padding=0)
    assert grid[0, :, 0].tolist() == [0, 255]


def test_bad_image_shape():
    with pytest.raises(ValueError, match="N, 1 or 3, H, W"):
        image_grid(torch.zeros(4, 2, 8, 8))


def test_scatter_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2000, 2, generator=g)
    samples = torch.randn(500, 2, generator=g) * 0.5 + 1
    picture = save_scatter(samples, tmp_path / "s.png", reference=data, title="step 100")
    assert picture.shape == (500, 500, 3)
    assert np.array_equal(read_png(tmp_path / "s.png"), picture)
    # Both colours are drawn: some orange-ish (samples) and some blue-ish (data) pixels.
    r, b = picture[..., 0].astype(int), picture[..., 2].astype(int)
    assert ((r - b) > 100).sum() > 100 and ((b - r) > 100).sum() > 100
    with pytest.raises(ValueError, match="N, 2"):
        save_scatter(torch.zeros(5, 3), tmp_path / "bad.png")


def test_loss_curve_and_metric_bars(tmp_path):
    steps = list(range(0, 1000, 10))
    losses = [1.0 / (1 + s / 100) + 0.01 for s in steps]
    picture = save_loss_curve(steps, losses, tmp_path / "loss.png")
    assert picture.shape == (400, 600, 3)
    assert np.array_equal(read_png(tmp_path / "loss.png"), picture)
    save_loss_curve([0, 1, 2], [0.5, -0.1, 0.2], tmp_path / "signed.png")  # linear axis for signed losses
    bars = save_metric_bars(
        ["meanflow 1", "meanflow 2", "euler 8", "heun 50"],
        [0.3, 0.2, 0.25, 0.05],
        [0.02, 0.02, 0.03, 0.01],
        tmp_path / "bars.png",
        floor=0.001,
        title="energy distance vs NFE",
    )
    assert bars.shape[2] == 3 and np.array_equal(read_png(tmp_path / "bars.png"), bars)
    with pytest.raises(ValueError):
        save_loss_curve([1, 2], [1.0], tmp_path / "x.png")
    with pytest.raises(ValueError):
        save_metric_bars(["a"], [1.0, 2.0], [0.1], tmp_path / "y.png")
