"""Under DDP, rank 0 settles `loss.jvp = auto` and every rank runs its choice.

Two CPU (gloo) processes whose own calibrations would disagree (each rank's resolver returns a
different mode here): both must end with rank 0's mode and a loss built for it.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from gloo_ranks import join, run_ranks
from rich.console import Console

from zoo.config.loading import load_config
from zoo.models import build_model
from zoo.training import distributed, trainer

OWN_CHOICE = {0: ("primal", "rank 0 timed it"), 1: ("selective", "rank 1 timed it")}


def rank_main(rank: int, world: int, port: int, out_dir: Path) -> None:
    join(rank, world, port)
    calls = []

    def own_resolver(cfg, model, device, batch_size, stored_mode):
        calls.append(rank)
        return OWN_CHOICE[rank]

    trainer.resolve_for_training = own_resolver  # the forked child's copy only
    cfg = load_config("moons", ["model.hidden=16", "model.depth=1", "loss.jvp=auto"])
    model = build_model(cfg.model, (2,), 0)
    state = SimpleNamespace(
        cfg=cfg, model=model, device=torch.device("cpu"), micro_batches=1, jvp_mode="nograd", loss_fn=None
    )
    trainer.choose_jvp_mode(state, None, Console(quiet=True))
    result = {"mode": state.jvp_mode, "loss_mode": state.loss_fn.jvp.name, "calls": calls}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


def test_rank_zero_chooses_the_jvp_mode_for_every_rank(tmp_path):
    run_ranks(rank_main, 2, tmp_path)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["mode"] for r in results] == ["primal", "primal"]
    assert [r["loss_mode"] for r in results] == ["primal", "primal"]
    assert [r["calls"] for r in results] == [[0], []]  # only rank 0 calibrated


def test_one_process_broadcast_returns_its_own_value():
    assert distributed.broadcast_from_main(("fused", "why")) == ("fused", "why")
