"""The latents source reading a latents folder (written here by hand, no VAE needed)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.config.schema import DataConfig
from zoo.data import DataNotFoundError, build_data


def write_latents(folder: Path, train: int, val: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in (("train", train), ("val", val)):
        np.save(folder / f"{split}_latents.npy", rng.normal(size=(count, 4, 4, 4)).astype(np.float16))
        np.save(folder / f"{split}_labels.npy", np.arange(count) % 3)
    meta = {
        "classes": ["a", "b", "c"],
        "image_size": 32,
        "vae": "stabilityai/sd-vae-ft-ema",
        "scale": 0.18215,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return np.load(folder / "train_latents.npy")


def test_batches_are_stored_latents_with_their_labels(tmp_path):
    latents = write_latents(tmp_path / "imagenet-latents", 7, 4)
    cfg = DataConfig(
        name="imagenet-latents", root=str(tmp_path), class_conditional=True, decode_latents=False
    )
    s = build_data(cfg, "cpu", 0, 5)
    assert (s.data_shape, s.num_train, s.num_classes, s.is_latent, s.is_image) == (
        (4, 4, 4),
        7,
        3,
        True,
        False,
    )
    assert (s.vae_name, s.vae_scale, s.vae) == ("stabilityai/sd-vae-ft-ema", 0.18215, None)
    x, y = s.next_batch(torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (5, 4, 4, 4)
    train = torch.from_numpy(latents).float()
    for sample, label in zip(x, y, strict=True):  # unflipped copies of stored latents, with their labels
        match = (train == sample).flatten(1).all(1).nonzero()
        assert len(match) == 1 and int(match) % 3 == int(label)
    held, held_y = s.held_out_labeled(100)
    assert held.shape == (4, 4, 4, 4) and sorted(held_y.tolist()) == [0, 0, 1, 2]


def test_another_latent_folder_and_shape_checks(tmp_path):
    write_latents(tmp_path / "celeba-latents", 5, 2)
    cfg = DataConfig(
        name="imagenet-latents", root=str(tmp_path), latent_folder="celeba-latents", decode_latents=False
    )
    assert build_data(cfg, "cpu", 0, 2).num_train == 5
    meta_path = tmp_path / "celeba-latents" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "latent_shape": [4, 8, 8]}))
    with pytest.raises(DataNotFoundError, match=r"shape \[4, 4, 4\], meta.json says \[4, 8, 8\]"):
        build_data(cfg, "cpu", 0, 2)


def test_missing_latents_point_to_the_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="zoo data encode-latents"):
        build_data(DataConfig(name="imagenet-latents", root=str(tmp_path)), "cpu", 0, 4)
