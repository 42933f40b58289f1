"""train.cuda_graph: a micro-batch's loss + backward replayed from a CUDA graph.

On CPU: the settings it refuses and the helpers it is built on.  On CUDA: gradients equal to
eager training's (same draws) over several optimiser steps, with accumulation, after eager code
touched the gradients, and under recapture; and a real `zoo train` run.
"""

import copy

import pytest
import torch
from model_helpers import labelled_cuda_batch, perturb
from tiny_runs import TINY_RUN, train_moons_variants

from zoo.config.schema import LossConfig, UNetConfig
from zoo.devices import cuda_fp32_precision
from zoo.losses import build_loss
from zoo.losses.base import Draws, flat_tensors, map_tensors
from zoo.losses.time_sampling import sample_t_r
from zoo.models import build_model
from zoo.training.step_graph import GraphedLossBackward
from zoo_cli.main import app

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (CUDA graphs); none on this machine"


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
    # (cuDNN may choose other algorithms while capturing) into lr-sized steps, so the weights would
    # differ by chance although every step's gradients match.  SGD's weights are linear in the
    # gradients checked at each step; at lr 0.1 every parameter moves (largest moves 5e-4 to 0.03
    # over the 4 steps; on a CPU, replaying from stale weights fails the gradient check for all).
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
