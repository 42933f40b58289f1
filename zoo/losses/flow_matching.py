"""Flow matching: regress the instantaneous velocity u(z_t, t, t) onto v = eps - x."""

import torch
from torch import Tensor

from zoo.flow import conditional_velocity, interpolate
from zoo.losses.base import Draws, Loss, draw_noise, drop_labels
from zoo.losses.time_sampling import sample_t
from zoo.models.base import FlowModel


class FlowMatchingLoss(Loss):
    name = "flow_matching"

    def draw(self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator) -> Draws:
        batch = x.shape[0]
        noise = draw_noise(x, generator)
        t = sample_t(batch, self.cfg, generator, dtype=x.dtype)
        y, dropped = drop_labels(model, y, self.cfg.class_dropout, batch, generator)
        return Draws(noise=noise, times=t, y=y, dropped=dropped)

    def evaluate(self, model: FlowModel, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor]]:
        t = draws.times
        z = interpolate(x, draws.noise, t)
        v = conditional_velocity(x, draws.noise)
        # The model output may be bf16 under autocast; the error is taken in fp32 (fp64 for fp64 data).
        dtype = torch.promote_types(x.dtype, torch.float32)
        loss = (model(z, t, t, draws.y).to(dtype) - v.to(dtype)).square().mean()
        return loss, {"loss": loss.detach(), "mse": loss.detach()}
