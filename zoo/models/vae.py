"""The Stable Diffusion VAE (diffusers' AutoencoderKL) as a frozen image <-> latent codec.

ImageNet DiT models train on SD-VAE latents: 256x256x3 images in [-1, 1] become 32x32x4
latents, multiplied by the VAE's scaling factor (0.18215 for the SD VAEs) so that they have
roughly unit variance.  diffusers is an optional dependency (`pip install 'zoo[vae]'`) and is
imported only when a VAE is built.
"""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_SD_VAE = "stabilityai/sd-vae-ft-ema"

# A 2-level, (32, 64)-channel AutoencoderKL with random weights: downsampling factor 2, builds
# and runs in milliseconds.  For tests and smoke runs, never for real latents.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("SDVAE needs diffusers: pip install 'zoo[vae]'") from err
    return AutoencoderKL


class SDVAE(nn.Module):
    """encode(x in [-1, 1]) -> scaled latents; decode(latents) -> images (about [-1, 1], unclamped).

    The autoencoder is frozen (eval mode, no gradients).
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(autoencoder.config.scaling_factor)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_SD_VAE) -> "SDVAE":
        """Load weights from a local folder or the Hugging Face cache / hub."""
        autoencoder_class = _autoencoder_class()
        try:
            autoencoder = autoencoder_class.from_pretrained(str(name_or_path), low_cpu_mem_usage=False)
        except OSError as err:  # diffusers' error for a missing folder, file or unreachable hub
            raise FileNotFoundError(
                f"SD-VAE weights not found at {str(name_or_path)!r}; download them on a machine "
                f"with network, e.g. `huggingface-cli download {DEFAULT_SD_VAE} --local-dir "
                f"vae/sd-vae-ft-ema`, copy the folder here and pass its path. diffusers said: {err}"
            ) from err
        return cls(autoencoder)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SDVAE":
        """Random weights from an AutoencoderKL config (e.g. TINY_VAE_CONFIG): no download."""
        return cls(_autoencoder_class().from_config(config))

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(3, H, W) -> (latent_channels, H / f, W / f)."""
        _, height, width = image_shape
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the VAE factor {f}")
        return (self.latent_channels, height // f, width // f)

    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents * scale; `sample=False` takes the mean."""
        posterior = self.autoencoder.encode(x).latent_dist
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        return latents * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images (B, 3, H, W)."""
        return self.autoencoder.decode(z / self.scale).sample
