"""Training losses: flow matching, MeanFlow, improved MeanFlow (iMF) and alpha-Flow, built from a LossConfig.

`cfg.jvp == "auto"` must be resolved first, as the trainer does:
    cfg = cfg.model_copy(update={"jvp": zoo.training.jvp_plan.plan_run(run_cfg, device).mode})
    loss_fn = build_loss(cfg)
"""

from zoo.config.schema import LossConfig
from zoo.losses.alphaflow import AlphaFlowLoss
from zoo.losses.base import Draws, Loss, LossOutput
from zoo.losses.flow_matching import FlowMatchingLoss
from zoo.losses.imf import ImprovedMeanFlowLoss
from zoo.losses.jvp import JVP_MODES, JvpStrategy, build_jvp
from zoo.losses.meanflow import MeanFlowLoss, MeanFlowTerms
from zoo.losses.time_sampling import TimePair, sample_t, sample_t_r


def build_loss(cfg: LossConfig) -> Loss:
    if cfg.kind == "meanflow":
        return MeanFlowLoss(cfg)
    if cfg.kind == "flow_matching":
        return FlowMatchingLoss(cfg)
    if cfg.kind == "imf":
        return ImprovedMeanFlowLoss(cfg)
    if cfg.kind == "alphaflow":
        return AlphaFlowLoss(cfg)
    raise ValueError(f"unknown loss kind {cfg.kind!r}; use 'meanflow', 'imf', 'alphaflow' or 'flow_matching'")


__all__ = [
    "AlphaFlowLoss",
    "JVP_MODES",
    "Draws",
    "FlowMatchingLoss",
    "ImprovedMeanFlowLoss",
    "JvpStrategy",
    "Loss",
    "LossOutput",
    "MeanFlowLoss",
    "MeanFlowTerms",
    "TimePair",
    "build_jvp",
    "build_loss",
    "sample_t",
    "sample_t_r",
]
