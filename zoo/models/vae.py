"""The Stable Diffusion VAE (diffusers' AutoencoderKL) as a frozen image <-> latent codec.

ImageNet DiT models train on SD-VAE latents: 256x256x3 images in [-1, 1] become 32x32x4
latents, multiplied by the VAE's scaling factor (0.18215 for the SD VAEs) so that they have
roughly unit variance.  diffusers is an optional dependency (`pip install -e '.[vae]'`) and is
imported only when a VAE is built.

Weights come from a local folder (what `save_pretrained` / `huggingface-cli download --local-dir`
writes: config.json + diffusion_pytorch_model.safetensors) or a Hugging Face hub id.  A hub id is
looked up in the local Hugging Face cache first; only when it is not there and the hub answers
is it downloaded.  Otherwise `from_pretrained` fails at once with a MissingAssetError saying what
to fetch and where to put it (diffusers itself would retry for half a minute, then fail).
"""

import functools
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from zoo.errors import MissingAssetError, MissingDependencyError

DEFAULT_SD_VAE = "stabilityai/sd-vae-ft-ema"
# Images decoded at a time: the SD-VAE decoder at 256 px holds about 0.4 GB of activations per
# image in fp32, so 16 fit any GPU zoo trains on with room to spare.
DECODE_BATCH = 16
# Seconds to wait for the hub's TCP handshake before calling it unreachable.
HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

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
        raise MissingDependencyError(
            "the Stable Diffusion VAE needs diffusers, which is not installed: pip install -e '.[vae]' "
            "in zoo's folder (or pip install 'diffusers>=0.42')"
        ) from err
    return AutoencoderKL


def is_hub_id(name: str) -> bool:
    """'owner/name' that is not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) accepts a TCP connection within a few seconds;
    False at once when HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def missing_vae_message(name: str, why: str) -> str:
    local = f"vae/{name.rsplit('/', 1)[-1]}"
    return (
        f"the VAE {name!r} cannot be loaded: {why}. Fetch it on a machine with network: "
        f"`huggingface-cli download {name if is_hub_id(name) else DEFAULT_SD_VAE} --local-dir {local}` "
        "(config.json and diffusion_pytorch_model.safetensors, about 335 MB for an SD-VAE), copy that "
        f"folder here and pass its path (--vae {local}; for training and `zoo eval`, data.vae={local})"
    )


class SDVAE(nn.Module):
    """encode(x in [-1, 1]) -> scaled latents; decode(latents) -> images (about [-1, 1], unclamped).

    The autoencoder is frozen (eval mode, no gradients).  `name` says where its weights came from.
    """

    def __init__(self, autoencoder: nn.Module, name: str = "") -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(autoencoder.config.scaling_factor)
        self.name = name

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_SD_VAE) -> "SDVAE":
        """Load weights from a local folder, the Hugging Face cache, or the hub (see the module doc)."""
        autoencoder_class = _autoencoder_class()
        name = str(name_or_path)
        folder = Path(name).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise MissingAssetError(missing_vae_message(name, f"{folder} holds no config.json"))
            return cls(cls._load(autoencoder_class, str(folder.resolve()), name), str(folder.resolve()))
        if not is_hub_id(name):
            raise MissingAssetError(missing_vae_message(name, f"there is no folder {folder}"))
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return cls(cls._load(autoencoder_class, name, name, local_files_only=True), name)
        if not hub_reachable():
            raise MissingAssetError(
                missing_vae_message(
                    name,
                    f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                    "cannot be reached",
                )
            )
        return cls(cls._load(autoencoder_class, name, name), name)

    @staticmethod
    def _load(autoencoder_class, source: str, name: str, **kwargs) -> nn.Module:
        try:
            # low_cpu_mem_usage=False: diffusers' default needs `accelerate`, which zoo does not require.
            return autoencoder_class.from_pretrained(source, low_cpu_mem_usage=False, **kwargs)
        except OSError as err:  # diffusers' error for a missing or damaged file, an interrupted download
            raise MissingAssetError(missing_vae_message(name, f"diffusers said: {err}")) from err

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SDVAE":
        """Random weights from an AutoencoderKL config (e.g. TINY_VAE_CONFIG): no download."""
        return cls(_autoencoder_class().from_config(config), "random weights")

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(3, H, W) -> (latent_channels, H / f, W / f)."""
        _, height, width = image_shape
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the VAE factor {f}")
        return (self.latent_channels, height // f, width // f)

    @torch.no_grad()
    def encode(
        self,
        x: Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents * scale: a draw mean + std * noise of the
        posterior (`noise` standard normal of the latents' shape, else drawn from `generator`),
        or its mean with `sample=False`."""
        posterior = self.autoencoder.encode(x).latent_dist
        if not sample:
            latents = posterior.mean
        elif noise is not None:
            latents = posterior.mean + posterior.std * noise.to(posterior.mean)
        else:
            latents = posterior.sample(generator=generator)
        return latents * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images (B, 3, H, W)."""
        return self.autoencoder.decode(z / self.scale).sample


@functools.cache
def _cached_vae(name: str, device: str) -> SDVAE:
    return SDVAE.from_pretrained(name).to(device)


def load_vae(name_or_path: str | Path, device: torch.device | str) -> SDVAE:
    """The VAE `name_or_path` on `device`, loaded once per process and then shared: training
    grids, sampling and scoring all decode with the same instance."""
    name = str(name_or_path)
    folder = Path(name).expanduser()
    key = str(folder.resolve()) if folder.is_dir() else name
    return _cached_vae(key, str(torch.device(device)))


@torch.no_grad()
def decode_latents(vae: SDVAE, latents: Tensor, batch_size: int = DECODE_BATCH) -> Tensor:
    """Scaled latents (N, C, h, w), on any device -> images (N, 3, H, W) in [-1, 1], float32 on
    the CPU; decoded `batch_size` at a time on the VAE's device."""
    if len(latents) == 0:
        raise ValueError("no latents to decode")
    images = [
        vae.decode(latents[start : start + batch_size].to(vae.device, torch.float32)).clamp(-1, 1).cpu()
        for start in range(0, len(latents), batch_size)
    ]
    return torch.cat(images)
