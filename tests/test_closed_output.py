"""`zoo train ... | head -1`: the reader of standard output goes away after one line; the run
still trains to the end and writes its run folder, and says so on stderr (one line)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import TINY_RUN

from zoo_cli.render import CLOSED_OUTPUT_NOTICE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a real process (its own pipe): ~10 s of CPU, most of it importing torch
def test_train_outlives_a_reader_that_closes_its_output(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    command = [
        sys.executable,
        "-m",
        "zoo_cli.main",
        "train",
        "moons",
        *TINY_RUN,
        "--steps",
        "3",
        "--run-name",
        "p",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline()  # the first line, as `head -1` reads it; then the pipe closes
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert stderr.count(CLOSED_OUTPUT_NOTICE) == 1 and "Traceback" not in stderr
    run = tmp_path / "outputs" / "p"
    assert json.loads((run / "heartbeat.json").read_text())["status"] == "finished"
    assert (run / "last.pt").is_file() and (run / "eval.json").is_file()
