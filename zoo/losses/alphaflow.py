"""alpha-Flow (Snap, 2025): a curriculum from trajectory flow matching to MeanFlow, in zoo's time
convention (zoo.flow).

    z_t = (1 - t) x + t eps,  v = eps - x  (or MeanFlow's guided v_g),  delta = alpha (t - r)
    u_tgt = [delta v + (t - delta - r) sg(u(z_t - delta v, t - delta, r))] / (t - r)
          = alpha v + (1 - alpha) sg(u(z_t - delta v, t - delta, r))
    loss = mean(w |u(z_t, t, r) - u_tgt|^2),  w = a / sg(|.|^2 + c)^p
    a = alpha on the r != t rows, 1 on the r = t rows

z_t - delta v is the same conditional path's point at t - delta, so the target averages v over
[t - delta, t] with u's own average over [r, t - delta].  alpha = 1 regresses u on v (trajectory flow
matching); as alpha -> 0, (u_tgt - (1 - alpha) u) / alpha -> v - (t - r) du/dt, MeanFlow's target.
The error u - u_tgt is then alpha times MeanFlow's, so with MeanFlow's adaptive weight (p = 1)
alone the gradient of the r != t rows would grow like 1/alpha, drowning the r = t rows and jumping
by orders of magnitude at the switch to the JVP target; the factor a = alpha (as in the authors'
code) keeps it at MeanFlow's scale throughout.  Samples with r = t (a fraction 1 - ratio) take v,
as MeanFlow's do.

alpha follows a sigmoid from 1 to 0 over the fraction of training done (loss.alpha_start to
loss.alpha_end, steepness loss.alpha_steepness); below loss.alpha_threshold the step computes
MeanFlow's JVP target instead (zoo.losses.meanflow), so most of training needs no JVP.  The trainer
tells the loss where training is (Loss.set_progress); the metrics record alpha and the path taken.
"""

import math

import torch
from torch import Tensor

from zoo.config.schema import LossConfig
from zoo.flow import conditional_velocity, expand_time, interpolate
from zoo.losses.base import Draws, Loss
from zoo.losses.jvp import select
from zoo.losses.meanflow import MeanFlowLoss
from zoo.models.base import FlowModel


def alpha_at(cfg: LossConfig, progress: float) -> float:
    """The curriculum's alpha at `progress` (fraction of training done): exactly 1 up to
    alpha_start, a sigmoid rescaled to fall from 1 to 0 between alpha_start and alpha_end, 0 after."""
    p = min(max((progress - cfg.alpha_start) / (cfg.alpha_end - cfg.alpha_start), 0.0), 1.0)
    k = cfg.alpha_steepness

    def sigmoid(value: float) -> float:
        return 1.0 / (1.0 + math.exp(-value))

    low, high = sigmoid(-k / 2), sigmoid(k / 2)
    return (sigmoid(k * (0.5 - p)) - low) / (high - low)


class AlphaFlowLoss(Loss):
    name = "alphaflow"

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.meanflow = MeanFlowLoss(cfg)  # its draws, guidance and, below the threshold, its target
        self.alpha = 1.0

    def set_progress(self, step: int, total_steps: int) -> None:
        self.alpha = alpha_at(self.cfg, step / total_steps)

    @property
    def uses_jvp(self) -> bool:
        return self.alpha < self.cfg.alpha_threshold

    def draw(self, model: FlowModel, x: Tensor, y: Tensor | None, generator: torch.Generator) -> Draws:
        return self.meanflow.draw(model, x, y, generator)

    def target(self, model: FlowModel, z: Tensor, v: Tensor, draws: Draws) -> Tensor:
        """u_tgt, without grad: v where r = t, the alpha-blend on the r != t rows."""
        times, alpha = draws.times, self.alpha
        ji = times.jvp_index
        t, r, v_rows = times.t[ji], times.r[ji], v[ji]
        delta = alpha * (t - r)
        with torch.no_grad():
            u_earlier = model(z[ji] - expand_time(delta, v_rows) * v_rows, t - delta, r, select(draws.y, ji))
        rows = alpha * v_rows + (1 - alpha) * u_earlier.to(v.dtype)
        return v.index_copy(0, ji, rows)

    def evaluate(self, model: FlowModel, x: Tensor, draws: Draws) -> tuple[Tensor, dict[str, Tensor]]:
        alpha = torch.tensor(self.alpha, device=x.device)
        if self.uses_jvp:
            loss, metrics = self.meanflow.evaluate(model, x, draws)
            return loss, {**metrics, "alpha": alpha, "jvp_path": torch.ones_like(alpha)}
        cfg = self.cfg
        dtype = torch.promote_types(x.dtype, torch.float32)  # the error in fp32 (fp64 for fp64 data)
        t, r = draws.times.t, draws.times.r
        z = interpolate(x, draws.noise, t)
        v = conditional_velocity(x, draws.noise)
        if self.meanflow.guidance_active:
            v = self.meanflow.guided_velocity(model, z, t, v, draws.y, draws.dropped)
        target = self.target(model, z, v, draws).to(dtype)
        u = model(z, t, r, draws.y).to(dtype)
        delta = (u - target).square().flatten(1).sum(1)
        weight = (delta.detach() + cfg.weight_c).pow(-cfg.weight_p)
        weight = weight * torch.ones_like(weight).index_fill(0, draws.times.jvp_index, self.alpha)
        loss = (weight * delta).mean()
        metrics = {
            "loss": loss.detach(),
            "mse": delta.detach().mean() / math.prod(x.shape[1:]),
            "weight": weight.mean(),
            "alpha": alpha,
            "jvp_path": torch.zeros_like(alpha),
        }
        return loss, metrics
