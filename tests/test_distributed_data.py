"""Under data parallelism a dataset is downloaded once, by rank 0, while the other ranks wait.

Two gloo processes build a dataset with data.download=true; the builder stands in for
torchvision's download (slow on rank 0, writing the files the others then read).
"""

import json
import time
from pathlib import Path

from gloo_ranks import join, run_ranks

import zoo.data
from zoo import distributed
from zoo.config.schema import DataConfig
from zoo.data import build_data


def rank_main(rank: int, world: int, port: int, root: Path) -> None:
    join(rank, world, port)

    def downloading_builder(cfg, device, seed, batch_size):
        files = Path(cfg.root) / "cifar-10-batches-py"
        present = files.is_dir()
        if not present:
            time.sleep(1.5)  # a download takes a while
            files.mkdir(parents=True)
            (files / f"by-rank{rank}").touch()
        return {"rank": rank, "found_files": present, "time": time.time()}

    zoo.data._IMAGE_BUILDERS["cifar10"] = downloading_builder  # this forked process's copy
    built = build_data(DataConfig(name="cifar10", root=str(root), download=True), "cpu", seed=0, batch_size=8)
    (root / f"rank{rank}.json").write_text(json.dumps(built))
    distributed.shutdown()


def test_rank_0_downloads_once_while_the_others_wait(tmp_path):
    run_ranks(rank_main, 2, tmp_path)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["found_files"] for r in results] == [False, True]  # rank 1 read what rank 0 downloaded
    assert sorted(p.name for p in (tmp_path / "cifar-10-batches-py").iterdir()) == ["by-rank0"]
