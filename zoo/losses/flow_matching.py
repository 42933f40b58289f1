"""Flow matching: regress the instantaneous velocity u(z_t, t, t) onto v = eps - x."""

import torch
from torch import Tensor

from zoo.flow import conditional_velocity, interpolate
from zoo.losses.base import Loss, LossOutput, draw_noise, drop_labels, metrics_to_floats
from zoo.losses.time_sampling import sample_t
from zoo.models.base import FlowModel


class FlowMatchingLoss(Loss):
    name = "flow_matching"

    def __call__(self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator) -> LossOutput:
        batch = x.shape[0]
        noise = draw_noise(x, generator)
        t = sample_t(batch, self.cfg, generator, dtype=x.dtype)
        y, _ = drop_labels(model, y, self.cfg.class_dropout, batch, generator)
        z = interpolate(x, noise, t)
        v = conditional_velocity(x, noise)
        # The model output may be bf16 under autocast; the error is taken in fp32 (fp64 for fp64 data).
        dtype = torch.promote_types(x.dtype, torch.float32)
        loss = (model(z, t, t, y).to(dtype) - v.to(dtype)).square().mean()
        return LossOutput(loss=loss, metrics=metrics_to_floats({"loss": loss, "mse": loss}))
