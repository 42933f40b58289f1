"""Under DDP every rank uses the finest micro-batch split any rank needed (two gloo processes)."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from gloo_ranks import join, run_ranks
from rich.console import Console

from zoo import distributed
from zoo.config.loading import load_config
from zoo.models import build_model
from zoo.training import trainer
from zoo.training.memory import MicroBatchPlan

OWN_PLAN = {0: MicroBatchPlan(1, 8, 100), 1: MicroBatchPlan(4, 2, 50)}  # rank 1 is short of memory


def rank_main(rank: int, world: int, port: int, out_dir: Path) -> None:
    join(rank, world, port)
    trainer.plan_micro_batches = lambda *args, **kwargs: OWN_PLAN[rank]  # this forked child only
    cfg = load_config("moons", ["model.hidden=16", "model.depth=1", "train.batch_size=16"])
    state = SimpleNamespace(
        cfg=cfg,
        model=build_model(cfg.model, (2,), 0),
        device=torch.device("cpu"),
        micro_batches=1,
        source=SimpleNamespace(batch_size=8),
    )
    plan = trainer.fit_batch_in_memory(state, Console(quiet=True))
    result = {
        "plan": [plan.micro_batches, plan.micro_batch_size],
        "state": state.micro_batches,
        "source": state.source.batch_size,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


def test_ranks_adopt_the_finest_split_any_rank_needed(tmp_path):
    run_ranks(rank_main, 2, tmp_path)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"plan": [4, 2], "state": 4, "source": 2}, (rank, result)


def test_one_process_max_is_its_own_value():
    assert distributed.max_across_ranks(3, torch.device("cpu")) == 3
