"""Helpers for tests that compare models' outputs and gradients."""

import torch

from zoo.losses.base import Draws, Loss


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Move a model off its initialisation: zero-initialised output layers make a fresh model
    ignore its inputs (output 0, and a gradient for the last layer only), which would let a
    comparison of two implementations pass whatever the layers before compute."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
    return model


def labelled_cuda_batch(
    loss_fn: Loss, model: torch.nn.Module, generator: torch.Generator
) -> tuple[torch.Tensor, Draws]:
    """A random CUDA batch of eight 3x8x8 images with labels in 0..2, and the loss's draws for it."""
    x = torch.randn(8, 3, 8, 8, device="cuda")
    y = torch.randint(0, 3, (8,), device="cuda")
    return x, loss_fn.draw(model, x, y, generator)
