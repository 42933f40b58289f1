"""Offline stand-ins for the latent pipeline: a tiny random AutoencoderKL saved as a local
folder (so the real `from_pretrained` path loads it), image folders drawn from a fixed seed,
and a small random CNN in Inception's place."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from zoo.metrics.inception import FeatureExtractor
from zoo.models.vae import SDVAE, TINY_VAE_CONFIG

CLASSES = ("ant", "bee", "cat")


def save_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """TINY_VAE_CONFIG with random weights, written as diffusers writes a downloaded VAE."""
    torch.manual_seed(seed)
    SDVAE.from_config(TINY_VAE_CONFIG).autoencoder.save_pretrained(folder)
    return folder


def make_image_folders(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/<k>.png, non-square images whose colour depends on the class (so a
    class-conditional model has something to learn), with noise on top."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                height, width = 20 + k % 3, 24
                base = np.array([200 * (label == 0), 200 * (label == 1), 200 * (label == 2)], dtype=float)
                pixels = base + rng.normal(0, 40, (height, width, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{k}.png")
    return root


class TinyFeatures(FeatureExtractor):
    """A fixed random CNN: 16 pooled features and 10 class probabilities from [0, 255] pixels."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.name = "tiny-random-cnn"
        self.resize = "none"
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, stride=2), nn.AdaptiveAvgPool2d(1)
        ).eval()
        self.head = nn.Linear(16, 10)

    @torch.no_grad()
    def __call__(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(pixels.float() / 127.5 - 1).flatten(1)
        return features, self.head(features).softmax(1)
