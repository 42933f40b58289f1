"""Pictures of what a model generates: an image grid, or a scatter over held-out data for 2-D."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zoo.config.schema import EvalConfig
from zoo.data import BatchSource
from zoo.data.latents import LatentSource
from zoo.evaluation import Method, draw_noise_and_labels, eval_mode, generate, no_progress
from zoo.models.base import FlowModel
from zoo.plotting import save_image_grid, save_loss_curve, save_scatter
from zoo.runs import RunDir
from zoo.solvers.samplers import sampler_guidance


@torch.no_grad()
def save_samples(
    model: FlowModel,
    source: BatchSource,
    method: Method,
    path: Path,
    cfg: EvalConfig,
    seed: int,
    title: str | None = None,
    on_batch: Callable[[], None] = no_progress,
) -> tuple[np.ndarray, str]:
    """Write a picture of `method`'s samples from seed `seed`'s noise: a grid of cfg.grid_size
    images (decoded, for latents), or up to cfg.n_samples 2-D points over held-out points.
    Returns it as an image array and a caption.

    `on_batch` is called after each sampled batch (see zoo.evaluation.generate)."""
    device = next(model.parameters()).device
    n = cfg.grid_size if source.is_image or source.is_latent else min(cfg.n_samples, 2000)
    noise, labels = draw_noise_and_labels(model, n, device, seed)
    with eval_mode(model):
        samples = generate(
            model, method, noise, labels, sampler_guidance(cfg), cfg.batch_size, on_batch=on_batch
        )
    caption = f"{method.label} ({method.nfe} NFE)"
    if source.is_image:
        image = save_image_grid(samples, path)
    elif source.is_latent:
        image, shown = save_latent_grid(source, samples, path)
        caption += f", {shown}"
    else:
        reference = source.held_out(n).float().cpu()
        image = save_scatter(samples, path, reference=reference, title=title or method.label)
    return image, caption


def save_latent_grid(source: LatentSource, latents: Tensor, path: Path) -> tuple[np.ndarray, str]:
    """A grid of latent samples decoded by the source's VAE; without one (data.decode_latents=false)
    the first three latent channels scaled to [-1, 1].  Returns the grid and what it shows."""
    if source.vae is not None:
        return save_image_grid(source.decode(latents), path), f"decoded by {source.vae_name}"
    preview = latents[:, :3] / latents[:, :3].abs().amax().clamp_min(1e-6)
    return save_image_grid(preview, path), "latent channels 0-2 (not decoded: data.decode_latents=false)"


def save_loss_plot(run: RunDir) -> None:
    """The training loss so far (all sessions of the run, from metrics.jsonl) as `loss.png`."""
    records = [r for r in run.read_metrics() if "train/loss" in r]
    if records:
        save_loss_curve(
            [r["step"] for r in records],
            [r["train/loss"] for r in records],
            run.loss_curve,
            title=f"{run.name}: training loss",
        )
