"""Data-parallel MeanFlow: the JVP runs on the plain module, gradients are synchronised by hand.

Truth: the gradient of the per-sample-mean loss on the full global batch in one process.  Two
gloo processes, each with half the batch (the same noise and times, split), must reach the
same averaged gradient — including a parameter that only one rank's samples use.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from zoo.training import distributed

BATCH = 16
DIM = 3


class TinyFlow(nn.Module):
    """u(z, t, r) with an extra branch used only for samples flagged `special`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM + 2, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, DIM))
        self.special = nn.Linear(DIM, DIM)
        self.never_used = nn.Linear(2, 2)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        u = self.net(torch.cat([z, t[:, None], (t - r)[:, None]], dim=1)) * self.scale
        if bool(flags.any()):
            u = u + flags[:, None] * self.special(z)
        return u


def meanflow_loss(model: TinyFlow, x, eps, t, r, flags) -> torch.Tensor:
    """MeanFlow: u_tgt = v - (t - r) du/dt via one JVP with tangents (v, 1, 0); adaptive weight."""
    z = (1 - t[:, None]) * x + t[:, None] * eps
    v = eps - x
    u, dudt = torch.func.jvp(
        lambda z_, t_, r_: model(z_, t_, r_, flags), (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r))
    )
    target = (v - (t - r)[:, None] * dudt).detach()
    per_sample = ((u - target) ** 2).sum(dim=1)
    weight = 1.0 / (per_sample.detach() + 1e-3) ** 0.75
    return (weight * per_sample).mean()


def make_problem(path: Path) -> None:
    torch.manual_seed(0)
    model = TinyFlow().double()
    g = torch.Generator().manual_seed(1)
    t = torch.rand(BATCH, generator=g, dtype=torch.float64)
    r = torch.rand(BATCH, generator=g, dtype=torch.float64) * t
    r[::4] = t[::4]  # some samples are plain flow matching (r = t)
    flags = torch.zeros(BATCH, dtype=torch.float64)
    flags[:3] = 1.0  # only the first rank's half uses `special`
    torch.save(
        {
            "model": model.state_dict(),
            "x": torch.randn(BATCH, DIM, generator=g, dtype=torch.float64),
            "eps": torch.randn(BATCH, DIM, generator=g, dtype=torch.float64),
            "t": t,
            "r": r,
            "flags": flags,
        },
        path,
    )


def gradients(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def rank_main(rank: int, world: int, port: int, problem: Path, out_dir: Path) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    distributed.init(device_type="cpu")
    data = torch.load(problem, weights_only=True)
    model = TinyFlow().double()
    model.load_state_dict(data["model"])
    if rank == 1:  # rank 1 starts from other weights: the broadcast must replace them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            model.scale.fill_(7.0)
    distributed.broadcast_parameters(model)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = meanflow_loss(model, *(data[k][part] for k in ("x", "eps", "t", "r", "flags")))
    loss.backward()
    distributed.all_reduce_gradients(model)
    torch.save(
        {
            "grads": gradients(model),
            "state": model.state_dict(),
            "rank": distributed.rank(),
            "world": distributed.world_size(),
        },
        out_dir / f"rank{rank}.pt",
    )
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    problem = tmp_path / "problem.pt"
    make_problem(problem)
    data = torch.load(problem, weights_only=True)
    model = TinyFlow().double()
    model.load_state_dict(data["model"])
    meanflow_loss(model, data["x"], data["eps"], data["t"], data["r"], data["flags"]).backward()
    expected = gradients(model)

    # fork: the children share the already imported torch (spawn would import it twice more)
    mp.start_processes(rank_main, args=(2, free_port(), problem, tmp_path), nprocs=2, join=True, start_method="fork")

    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert (result["rank"], result["world"]) == (rank, 2)
        for name, value in data["model"].items():
            torch.testing.assert_close(result["state"][name], value, rtol=0, atol=0)
        assert result["grads"]["never_used.weight"] is None and expected["never_used.weight"] is None
        for name, grad in expected.items():
            if grad is None:
                continue
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-12, atol=1e-14, msg=name)
    # the special branch really had gradient on one rank only: otherwise the test proves less
    assert expected["special.weight"].abs().sum() > 0


def test_halves_differ_from_the_whole_without_synchronisation(tmp_path):
    """Guard for the test above: one rank's own gradient is not the global one."""
    problem = tmp_path / "problem.pt"
    make_problem(problem)
    data = torch.load(problem, weights_only=True)
    whole, half = TinyFlow().double(), TinyFlow().double()
    whole.load_state_dict(data["model"])
    half.load_state_dict(data["model"])
    meanflow_loss(whole, data["x"], data["eps"], data["t"], data["r"], data["flags"]).backward()
    part = slice(0, BATCH // 2)
    meanflow_loss(half, *(data[k][part] for k in ("x", "eps", "t", "r", "flags"))).backward()
    assert not torch.allclose(half.net[0].weight.grad, whole.net[0].weight.grad)


def test_single_process_helpers_are_no_ops():
    model = TinyFlow()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distributed.init()  # no torchrun environment: nothing to join
    distributed.broadcast_parameters(model)
    distributed.all_reduce_gradients(model)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert distributed.mean_across_ranks({"loss": 2.0}, torch.device("cpu")) == {"loss": 2.0}


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
