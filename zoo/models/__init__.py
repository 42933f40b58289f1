"""Networks u(z, t, r, y) of the average velocity (see zoo.flow) and the SD-VAE codec."""

from zoo.config.schema import DiTConfig, MLPConfig, ModelConfig, UNetConfig
from zoo.models.base import FlowModel
from zoo.models.dit import DiT
from zoo.models.mlp import MLP
from zoo.models.unet import UNet
from zoo.models.vae import SDVAE

__all__ = [
    "DiT",
    "FlowModel",
    "MLP",
    "SDVAE",
    "UNet",
    "build_model",
    "count_parameters",
]


def build_model(cfg: ModelConfig, data_shape: tuple[int, ...], num_classes: int = 0) -> FlowModel:
    """The network for `cfg.arch` on data of `data_shape` ((dim,) vectors or (C, H, W) images).

    `num_classes > 0` builds a class-conditional model with an extra null label for guidance.
    """
    data_shape = tuple(data_shape)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    is_image = len(data_shape) == 3
    if isinstance(cfg, MLPConfig):
        if len(data_shape) != 1:
            raise ValueError(
                f"model.arch='mlp' needs vector data of shape (dim,), but the data has shape "
                f"{data_shape}; use model.arch='unet' or 'dit' for images"
            )
        return MLP(cfg, data_shape, num_classes)
    if not is_image:
        raise ValueError(
            f"model.arch={cfg.arch!r} needs images of shape (channels, height, width), but the "
            f"data has shape {data_shape}; use model.arch='mlp' for 2-D/vector data"
        )
    if isinstance(cfg, UNetConfig):
        return UNet(cfg, data_shape, num_classes)
    if isinstance(cfg, DiTConfig):
        return DiT(cfg, data_shape, num_classes)
    raise ValueError(f"unknown model config {type(cfg).__name__}")


def count_parameters(model: FlowModel) -> int:
    return sum(p.numel() for p in model.parameters())
