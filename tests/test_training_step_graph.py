"""train.cuda_graph: a micro-batch's loss + backward replayed from a CUDA graph.

On CPU: the settings it refuses and the helpers it is built on.  On CUDA: gradients equal to
eager training's (same draws) over several optimiser steps, with accumulation, after eager code
touched the gradients, and under recapture; and a real `zoo train` run.
"""

import copy
import re

import pytest
import torch
from model_helpers import labelled_cuda_batch, perturb
from tiny_runs import TINY_RUN, train_moons_variants

from zoo.bench.calibration import candidate_modes
from zoo.config.loading import ConfigError, load_config
from zoo.config.schema import LossConfig, UNetConfig
from zoo.losses import build_loss
from zoo.losses.base import Draws, flat_tensors, map_tensors
from zoo.losses.jvp import cuda_fp32_precision
from zoo.losses.time_sampling import sample_t_r
from zoo.models import build_model
from zoo.training.step_graph import GraphedLossBackward, StepGraphError, check_capturable
from zoo.training.trainer import capturable, compilable, faster_step_tip
from zoo_cli.main import app

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (CUDA graphs); none on this machine"


@pytest.mark.parametrize(
    "device, precision, mode, fix",
    [
        ("cpu", "fp32", "fused", "train.cuda_graph=false"),
        ("cuda", "fp16", "fused", "precision=bf16"),
        ("cuda", "bf16", "cuda_graph", "loss.jvp=fused"),
        ("cuda", "fp32", "compile", "loss.jvp=fused"),
    ],
)
def test_settings_a_captured_step_cannot_run_are_refused_with_the_fix(device, precision, mode, fix) -> None:
    with pytest.raises(StepGraphError, match=fix.replace(".", r"\.")):
        check_capturable(torch.device(device), precision, mode)


def test_capturable_settings_pass() -> None:
    for mode in ("fused", "primal", "full_batch", "selective", "nograd", "auto"):
        check_capturable(torch.device("cuda"), "bf16", mode)


def test_auto_does_not_offer_modes_that_cannot_run_inside_a_captured_step() -> None:
    cuda = torch.device("cuda")
    assert "cuda_graph" in candidate_modes(cuda)
    captured = candidate_modes(cuda, captured_step=True)
    assert "cuda_graph" not in captured and "fused" in captured


def test_map_tensors_reaches_every_tensor_of_the_draws_and_keeps_the_structure() -> None:
    generator = torch.Generator().manual_seed(0)
    times = sample_t_r(6, LossConfig(ratio=0.5), generator)
    draws = Draws(noise=torch.randn(6, 2), times=times, y=None, dropped=torch.zeros(6, dtype=torch.bool))
    doubled = map_tensors(draws, lambda t: t * 2 if t.is_floating_point() else t)
    assert doubled.y is None and doubled.times.n_jvp == times.n_jvp == 3
    torch.testing.assert_close(doubled.times.t, times.t * 2)
    torch.testing.assert_close(doubled.noise, draws.noise * 2)
    # noise, then the TimePair's t, r, mask, jvp_index, flow_index, then dropped
    assert [tuple(t.shape) for t in flat_tensors(draws)] == [(6, 2), (6,), (6,), (6,), (3,), (3,), (6,)]


# ----------------------------------------------------------------------------- CUDA


def tiny_unet(num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = UNetConfig(
        channels=16, channel_mults=[1, 2], blocks_per_res=1, attention_res=[4], dropout=0.0, num_groups=8
    )
    return build_model(cfg, (3, 8, 8), num_classes).cuda().train()


def grads_of(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_same_grads(a, b, **tol) -> None:
    assert [g is None for g in a] == [g is None for g in b]
    for ga, gb in zip(a, b, strict=True):
        if ga is not None:
            torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize(
    "kind, mode", [("flow_matching", "nograd"), ("meanflow", "fused"), ("meanflow", "primal")]
)
def test_replayed_steps_give_eager_gradients_as_the_weights_change(kind, mode) -> None:
    eager_model = perturb(tiny_unet(num_classes=3))  # off the zero init: every parameter gets a gradient
    graph_model = copy.deepcopy(eager_model)
    loss_fn = build_loss(LossConfig(kind=kind, jvp=mode, ratio=0.5, jvp_precision="fp32", class_dropout=0.2))
    # SGD, not Adam: Adam's m / (sqrt(v) + eps) turns last-bit differences in near-zero gradients
    # (cuDNN may choose other algorithms while capturing) into lr-sized steps, so the weights then
    # differed by chance (H200, 2026-12-04: one element in 2304 off by 2e-5 after 4 steps, every
    # step's gradients matching).  SGD's weights are linear in the gradients checked at each step;
    # at lr 0.1 every parameter moves (largest moves 5e-4 to 0.03 over the 4 steps; checked on a
    # CPU, where replaying from stale weights failed the gradient check for all of them).  This
    # SGD version first runs on the next GPU lent.
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    graph_opt = torch.optim.SGD(graph_model.parameters(), lr=0.1)
    graphed = GraphedLossBackward(loss_fn, autocast_dtype=None)
    generator = torch.Generator(device="cuda").manual_seed(1)
    with cuda_fp32_precision("ieee"):
        for step in range(4):
            x, draws = labelled_cuda_batch(loss_fn, eager_model, generator)
            loss, metrics = loss_fn.evaluate(eager_model, x, draws)
            loss.backward()
            replayed = graphed(graph_model, x, draws)
            torch.testing.assert_close(replayed["loss"], metrics["loss"], rtol=1e-5, atol=1e-6)
            assert_same_grads(grads_of(graph_model), grads_of(eager_model), rtol=1e-4, atol=1e-6)
            for opt in (eager_opt, graph_opt):
                opt.step()
            eager_opt.zero_grad(set_to_none=True)
            # Every other step the gradients are set to None, as eager code does: replays reattach them.
            graph_opt.zero_grad(set_to_none=step % 2 == 1)
    assert graphed.captures == 1  # the weights changed in place: no recapture, no stale weights
    for a, b in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_accumulated_replays_equal_the_eager_sum_and_new_shapes_recapture() -> None:
    model = tiny_unet()
    loss_fn = build_loss(LossConfig(kind="meanflow", jvp="fused", ratio=0.25, jvp_precision="fp32"))
    graphed = GraphedLossBackward(loss_fn, autocast_dtype=None)
    generator = torch.Generator(device="cuda").manual_seed(2)
    batches = [torch.randn(8, 3, 8, 8, device="cuda") for _ in range(2)]
    draws = [loss_fn.draw(model, x, None, generator) for x in batches]
    with cuda_fp32_precision("ieee"):
        model.zero_grad(set_to_none=True)
        for x, d in zip(batches, draws, strict=True):
            (loss_fn.evaluate(model, x, d)[0] / 2).backward()
        eager = grads_of(model)
        model.zero_grad(set_to_none=True)
        for x, d in zip(batches, draws, strict=True):
            graphed(model, x, d, divisor=2)
        assert_same_grads(grads_of(model), eager, rtol=1e-4, atol=1e-6)
        # A gradient accumulated before a recapture survives it (warm-up runs must not leak in).
        bigger = torch.randn(12, 3, 8, 8, device="cuda")
        bigger_draws = loss_fn.draw(model, bigger, None, generator)
        before = grads_of(model)
        graphed(model, bigger, bigger_draws)
        assert graphed.captures == 2
        after = grads_of(model)
        model.zero_grad(set_to_none=True)
        loss_fn.evaluate(model, bigger, bigger_draws)[0].backward()
        alone = grads_of(model)
    for b, a, g in zip(before, after, alone, strict=True):
        torch.testing.assert_close(a, b + g, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_replays_under_bf16_autocast_follow_eager_bf16_as_the_weights_change() -> None:
    """Over Adam steps: a replay that read bf16 copies of the weights made before an update
    (autocast's cache, Conv2d's cast) would drift away from eager training."""
    eager_model = tiny_unet()
    graph_model = copy.deepcopy(eager_model)
    loss_fn = build_loss(LossConfig(kind="meanflow", jvp="fused", ratio=0.5, jvp_precision="bf16"))
    graphed = GraphedLossBackward(loss_fn, autocast_dtype=torch.bfloat16)
    eager_opt = torch.optim.Adam(eager_model.parameters(), lr=1e-2)
    graph_opt = torch.optim.Adam(graph_model.parameters(), lr=1e-2)
    generator = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):
        x = torch.randn(8, 3, 8, 8, device="cuda")
        draws = loss_fn.draw(eager_model, x, None, generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn.evaluate(eager_model, x, draws)
        loss.backward()
        metrics = graphed(graph_model, x, draws)
        torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=2e-2, atol=1e-3)
        assert_same_grads(grads_of(graph_model), grads_of(eager_model), rtol=5e-2, atol=5e-3)
        for opt in (eager_opt, graph_opt):
            opt.step()
            opt.zero_grad(set_to_none=opt is eager_opt)
    assert graphed.captures == 1
    for a, b in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_replaced_weights_and_a_mode_switch_trigger_a_recapture() -> None:
    model = tiny_unet(num_classes=3)
    loss_fn = build_loss(LossConfig(kind="meanflow", jvp="fused", ratio=0.5, jvp_precision="fp32"))
    graphed = GraphedLossBackward(loss_fn, autocast_dtype=None)
    generator = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(8, 3, 8, 8, device="cuda")
    y = torch.randint(0, 3, (8,), device="cuda")

    def replay_matches_eager(expected_captures: int) -> None:
        draws = loss_fn.draw(model, x, y, generator)
        model.zero_grad(set_to_none=True)
        loss_fn.evaluate(model, x, draws)[0].backward()
        eager = grads_of(model)
        model.zero_grad(set_to_none=True)
        graphed(model, x, draws)
        assert graphed.captures == expected_captures
        assert_same_grads(grads_of(model), eager, rtol=1e-4, atol=1e-6)

    with cuda_fp32_precision("ieee"):
        replay_matches_eager(1)
        replay_matches_eager(1)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data * 0.9  # new storage: the old graph would still read the old weights
        replay_matches_eager(2)
        model.eval()
        replay_matches_eager(3)
        model.train()
        replay_matches_eager(4)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_zoo_train_with_a_captured_step_follows_the_eager_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    common = [*TINY_RUN, "device=cuda", "loss.jvp=fused", "tracking.enabled=false", "--steps", "20"]
    runs = train_moons_variants(app, common, {"eager": [], "graph": ["train.cuda_graph=true"]})
    losses = {name: logged for name, (logged, _) in runs.items()}
    assert len(losses["graph"]) == len(losses["eager"]) == 4
    # Same draws from the same generator: the runs agree up to TF32 rounding.
    torch.testing.assert_close(
        torch.tensor(losses["graph"]), torch.tensor(losses["eager"]), rtol=5e-3, atol=1e-4
    )


def test_a_resumed_run_whose_mode_cannot_be_captured_is_told_to_resume_without_the_captured_step() -> None:
    # Its JVP mode is fixed by the checkpoint, so "change loss.jvp" would be no fix.
    cfg = load_config("moons", ["loss.kind=meanflow", "train.cuda_graph=true"])
    with pytest.raises(ConfigError, match=r"loss\.jvp='cuda_graph'.*resume it without train\.cuda_graph"):
        capturable(torch.device("cuda"), cfg, "cuda_graph", resumed=True)
    with pytest.raises(ConfigError, match=r"loss\.jvp=fused"):
        capturable(torch.device("cuda"), cfg, "cuda_graph", resumed=False)


@pytest.mark.parametrize(
    "device, overrides, mode, resumed, named",
    [
        ("cuda", [], "auto", False, {"train.cuda_graph=true", "train.compile=true"}),
        ("cuda", ["loss.kind=flow_matching"], "auto", False, {"train.cuda_graph=true", "train.compile=true"}),
        ("cuda", ["precision=fp16"], "auto", False, {"train.compile=true"}),  # fp16 cannot be captured
        ("cuda", ["loss.jvp_precision=fp32"], "auto", False, {"train.cuda_graph=true"}),  # compile: TF32 only
        ("cuda", ["precision=fp16", "loss.jvp_precision=fp32"], "auto", False, set()),
        (
            "cuda",
            ["loss.jvp=selective"],
            "selective",
            False,
            {"train.cuda_graph=true"},
        ),  # compile: fused only
        ("cuda", ["loss.jvp=cuda_graph"], "cuda_graph", False, set()),
        ("cuda", [], "selective", True, {"train.cuda_graph=true"}),  # a resumed run keeps its mode
        ("cuda", [], "cuda_graph", True, set()),
        ("cuda", ["train.cuda_graph=true"], "auto", False, set()),
        ("cuda", ["train.compile=true"], "auto", False, set()),
        ("cpu", [], "auto", False, set()),
    ],
)
def test_a_cuda_run_with_eager_steps_is_pointed_at_the_faster_steps_it_accepts(
    device, overrides, mode, resumed, named
) -> None:
    cfg = load_config("moons", overrides)
    tip = faster_step_tip(torch.device(device), cfg, mode, resumed)
    offered = set() if tip is None else set(re.findall(r"train\.\w+=true", tip))
    assert offered == named
    # Independently of the expectations above: every option named is accepted by the run's checks.
    checks = {"train.cuda_graph=true": capturable, "train.compile=true": compilable}
    for option in offered:
        checks[option](torch.device(device), load_config("moons", [*overrides, option]), mode, resumed)
