"""Data-parallel MeanFlow: the JVP runs on the plain module, gradients are synchronised by hand.

The code under test is the trainer's own step (zoo.training.trainer.train_step: zoo's MeanFlow
loss from build_loss, grad_accum micro-batches, the all-reduce) on a state from build_state.

Truth: the gradient one process computes for the same global batch.  One process with 4
micro-batches of 4 draws them one after the other from its generator; two gloo processes
with grad_accum=2 (2 micro-batches of 4 each) start their generators where the single process
was at micro-batch 0 and 2, so together they draw exactly the same samples, noise and times.
The gradients the optimiser receives must then be equal.
"""

import copy
from pathlib import Path

import pytest
import torch
from gloo_ranks import join, run_ranks
from torch import nn

from zoo import distributed
from zoo.config.loading import load_config
from zoo.training import trainer

BATCH = 16
MICRO = 4
# Gradient clipping off: it rescales the gradient and would hide a wrongly scaled average.
CONFIG = [
    "model.hidden=32",
    "model.depth=2",
    "data.class_conditional=true",
    "loss.jvp=nograd",
    "optim.grad_clip=0",
    "device=cpu",
    "run_name=grads",
]


def config(batch_size: int, grad_accum: int):
    return load_config("moons", [*CONFIG, f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}"])


def record_draws(state: trainer.TrainState) -> list[tuple[torch.Tensor, dict]]:
    """The generator and data state before each micro-batch the state draws from now on."""
    draws = []
    draw = state.source.next_batch

    def recording(generator: torch.Generator):
        draws.append((generator.get_state(), copy.deepcopy(state.source.state_dict())))
        return draw(generator)

    state.source.next_batch = recording
    return draws


def record_gradients(state: trainer.TrainState) -> dict[str, torch.Tensor | None]:
    """The gradients the optimiser steps with (after accumulation, all-reduce and clipping)."""
    seen: dict[str, torch.Tensor | None] = {}
    step = state.optimizer.step

    def recording(*args, **kwargs):
        seen.update(
            {n: None if p.grad is None else p.grad.clone() for n, p in state.model.named_parameters()}
        )
        return step(*args, **kwargs)

    state.optimizer.step = recording
    return seen


def one_step_from(
    batch_size: int, grad_accum: int, start: tuple[torch.Tensor, dict] | None
) -> tuple[dict, list, dict]:
    """train_step on a fresh state (this process's rank and world), from the draw state `start`:
    the gradients, the draws and the step's metrics."""
    state = trainer.build_state(config(batch_size, grad_accum), torch.device("cpu"))
    if start is not None:
        state.generator.set_state(start[0])
        state.source.load_state_dict(start[1])
    draws = record_draws(state)
    gradients = record_gradients(state)
    metrics = trainer.train_step(state)
    assert state.micro_batches == grad_accum and len(draws) == grad_accum
    assert state.source.batch_size == MICRO
    return gradients, draws, metrics


def rank_main(rank: int, world: int, port: int, starts: list, out_dir: Path) -> None:
    join(rank, world, port)
    gradients, _, metrics = one_step_from(BATCH, grad_accum=2, start=starts[2 * rank])
    result = {"grads": gradients, "metrics": metrics, "world": distributed.world_size()}
    torch.save(result, out_dir / f"rank{rank}.pt")
    distributed.shutdown()


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    expected, draws, metrics = one_step_from(BATCH, grad_accum=BATCH // MICRO, start=None)
    run_ranks(rank_main, 2, draws, tmp_path)

    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["world"] == 2
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            assert grad is not None and grad.abs().sum() > 0, name  # a zero gradient would prove nothing
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        # Every rank reports the losses of the whole global batch, as the one process does.
        for key in ("loss", "mse"):
            assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-5), key

    # Guard: one rank's own half of the batch gives another gradient (else this proves nothing).
    half, _, half_metrics = one_step_from(BATCH // 2, grad_accum=2, start=draws[0])
    assert half_metrics["mse"] != pytest.approx(metrics["mse"], rel=1e-3)
    flat = {
        key: torch.cat([g.flatten() for g in grads.values()])
        for key, grads in (("half", half), ("all", expected))
    }
    assert (flat["half"] - flat["all"]).norm() > 0.1 * flat["all"].norm()


def metrics_rank(rank: int, world: int, port: int, out_dir: Path) -> None:
    join(rank, world, port)
    mine = {"max_sample_mse": [5.0, 2.0][rank], "mse": [1.0, 3.0][rank], "loss": [0.5, 0.25][rank]}
    torch.save(distributed.reduce_metrics(mine, torch.device("cpu")), out_dir / f"rank{rank}.pt")
    distributed.shutdown()


def test_step_metrics_are_the_mean_over_ranks_and_the_max_of_a_max_metric(tmp_path):
    run_ranks(metrics_rank, 2, tmp_path)
    for rank in (0, 1):
        reduced = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert list(reduced) == ["max_sample_mse", "mse", "loss"]
        assert reduced == {"max_sample_mse": 5.0, "mse": 2.0, "loss": 0.375}


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.rank0_only = nn.Linear(3, 3)
        self.never_used = nn.Linear(3, 3)


def none_gradient_rank(rank: int, world: int, port: int, out_dir: Path) -> None:
    join(rank, world, port)
    torch.manual_seed(0)
    module = TwoBranches()
    x = torch.full((2, 3), float(rank + 1))
    out = module.shared(x) + (module.rank0_only(x) if rank == 0 else 0)
    out.sum().backward()
    distributed.all_reduce_gradients(module)
    torch.save({n: p.grad for n, p in module.named_parameters()}, out_dir / f"rank{rank}.pt")
    distributed.shutdown()


def test_a_parameter_without_gradient_on_one_rank_counts_as_zero_there(tmp_path):
    run_ranks(none_gradient_rank, 2, tmp_path)
    torch.manual_seed(0)
    module = TwoBranches()
    # One process on both ranks' samples: shared sees both, rank0_only rank 0's, with mean over ranks.
    (module.shared(torch.full((2, 3), 1.0)).sum() + module.shared(torch.full((2, 3), 2.0)).sum()).mul(
        0.5
    ).backward()
    (module.rank0_only(torch.full((2, 3), 1.0)).sum() * 0.5).backward()
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert grads["never_used.weight"] is None  # no gradient anywhere: the optimiser skips it
        for name in ("shared.weight", "shared.bias", "rank0_only.weight", "rank0_only.bias"):
            torch.testing.assert_close(grads[name], dict(module.named_parameters())[name].grad, msg=name)


def test_single_process_helpers_are_no_ops():
    model = nn.Linear(3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.ones(1, 3)).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    distributed.init()  # no torchrun environment: nothing to join
    distributed.broadcast_parameters(model)
    distributed.all_reduce_gradients(model)
    distributed.wait_for_main()
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[k], p.grad) for k, p in model.named_parameters())
    assert distributed.reduce_metrics({"loss": 2.0}, torch.device("cpu")) == {"loss": 2.0}


def test_torchrun_without_rendezvous_variables_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(distributed.DistributedError, match="torchrun"):
        distributed.init(device_type="cpu")


def test_torchrun_command_runs_a_module_per_process():
    command = distributed.torchrun_command(4, "zoo.remote.worker", ["--config", "c.json"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[-4:] == ["-m", "zoo.remote.worker", "--config", "c.json"]
    with pytest.raises(ValueError):
        distributed.torchrun_command(0, "m", [])
