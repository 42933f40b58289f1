"""`zoo train --nproc 2`: the real trainer under torchrun, two CPU (gloo) processes.

The gradient arithmetic is proven exact in test_distributed_grads.py; this checks the wiring:
torchrun starts, both ranks train in lockstep to the end, and only rank 0 writes the run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import TINY_RUN

from zoo.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_RUN


@pytest.mark.slow
def test_zoo_train_with_two_processes(tmp_path):
    env = {
        **os.environ,
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoo_cli.main",
            "train",
            "moons",
            *TINY,
            "--steps",
            "20",
            "--run-name",
            "ddp",
            "--nproc",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "outputs" / "ddp"
    heartbeat = json.loads((run / "heartbeat.json").read_text())
    assert heartbeat["status"] == "finished" and heartbeat["step"] == 20
    assert load_checkpoint(run / "last.pt")["step"] == 20
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == [5, 10, 15, 20]  # one writer: no record twice
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["ddp"]
