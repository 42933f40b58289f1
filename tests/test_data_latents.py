"""ImageNet latents: the encode step (with a stand-in encoder) and the source reading its files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zoo.config.schema import DataConfig
from zoo.data import DataNotFoundError, build_data
from zoo.data.latents import LATENT_FOLDER, encode_images
from zoo.data.sources import CenterCropResize, ImageFiles


def fake_encoder(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for the SD-VAE: 4 channels at 1/8 resolution, deterministic."""
    pooled = F.avg_pool2d(x, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * 0.18215


def make_split(root: Path, split: str, count: int) -> ImageFiles:
    files, labels = [], []
    for i in range(count):
        path = root / "imgs" / split / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 40), (10 * i, 255 - 10 * i, 128)).save(path)
        files.append(path)
        labels.append(i % 3)
    return ImageFiles(files, labels, CenterCropResize(32))


def test_encode_then_train_on_latents(tmp_path):
    out = tmp_path / LATENT_FOLDER
    logged: list[str] = []
    for split, count in (("train", 7), ("val", 4)):
        summary = encode_images(
            fake_encoder,
            make_split(tmp_path, split, count),
            out,
            split,
            device=torch.device("cpu"),
            batch_size=3,
            num_workers=0,
            log=logged.append,
        )
        assert summary["images"] == count
    (out / "meta.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    assert not list(out.glob("*.tmp"))
    latents = np.load(out / "train_latents.npy")
    assert latents.shape == (7, 4, 4, 4) and latents.dtype == np.float16
    # Image 2 is the solid colour (20, 235, 128): its latent is that colour in [-1, 1] times 0.18215.
    expected = (np.array([20, 235, 128]) / 127.5 - 1) * 0.18215
    assert np.allclose(latents[2, :3, 0, 0], expected, atol=1e-3)
    assert any("7/7" in line for line in logged)

    s = build_data(
        DataConfig(name="imagenet-latents", root=str(tmp_path), class_conditional=True), "cpu", 0, 5
    )
    assert (s.data_shape, s.num_train, s.num_classes, s.is_latent, s.is_image) == (
        (4, 4, 4),
        7,
        3,
        True,
        False,
    )
    x, y = s.next_batch(torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (5, 4, 4, 4)
    train = torch.from_numpy(latents).float()
    for sample, label in zip(x, y, strict=True):  # unflipped copies of stored latents, with their labels
        match = (train == sample).flatten(1).all(1).nonzero()
        assert len(match) == 1 and int(match) % 3 == int(label)
    held, held_y = s.held_out_labeled(100)
    assert held.shape == (4, 4, 4, 4) and sorted(held_y.tolist()) == [0, 0, 1, 2]


def test_missing_latents_point_to_the_script(tmp_path):
    with pytest.raises(DataNotFoundError, match="encode_latents.py"):
        build_data(DataConfig(name="imagenet-latents", root=str(tmp_path)), "cpu", 0, 4)
