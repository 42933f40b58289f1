"""Pictures of what a model generates: an image grid, or a scatter over held-out data for 2-D."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zoo.config.schema import ZooConfigBody
from zoo.data import BatchSource
from zoo.data.latents import LatentSource
from zoo.evaluation import draw_noise_and_labels, eval_mode, generate, headline_method, no_progress
from zoo.models.base import FlowModel
from zoo.plotting import save_image_grid, save_loss_curve, save_scatter
from zoo.runs import RunDir
from zoo.solvers.samplers import sampler_guidance


@torch.no_grad()
def save_samples(
    model: FlowModel,
    source: BatchSource,
    meanflow: bool,
    path: Path,
    cfg: ZooConfigBody,
    on_batch: Callable[[], None] = no_progress,
) -> tuple[np.ndarray, str]:
    """Write the picture for the headline sampler; returns it as an image array and a caption.

    `on_batch` is called after each sampled batch (see zoo.evaluation.generate)."""
    method = headline_method(cfg.eval, meanflow)  # the sampler `zoo eval` pictures and scores by FID
    device = next(model.parameters()).device
    n = cfg.eval.grid_size if source.is_image or source.is_latent else min(cfg.eval.n_samples, 2000)
    noise, labels = draw_noise_and_labels(model, n, device, seed=cfg.seed + 1)
    with eval_mode(model):
        samples = generate(
            model, method, noise, labels, sampler_guidance(cfg.eval), cfg.eval.batch_size, on_batch=on_batch
        )
    if source.is_image:
        image = save_image_grid(samples, path)
    elif source.is_latent:
        image, shown = save_latent_grid(source, samples, path)
        return image, f"{method.label} ({method.nfe} NFE), {shown}"
    else:
        image = save_scatter(samples, path, reference=source.held_out(n).float().cpu(), title=method.label)
    return image, f"{method.label} ({method.nfe} NFE)"


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
