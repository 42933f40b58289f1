"""Shared builders for the remote tests: real trackio databases, real checkpoints, Volume layouts.

trackio binds TRACKIO_DIR when it is imported, so each database is written by a short
subprocess with its own TRACKIO_DIR, and read back through trackio's own CLI.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from zoo.checkpoints import save_checkpoint
from zoo.runs import RunDir

PYTHON = sys.executable
TRACKIO_CLI = str(Path(sys.executable).parent / "trackio")
REPO = Path(__file__).resolve().parents[1]

_LOG_SCRIPT = """
import json, sys
import numpy as np
import trackio
spec = json.loads(sys.argv[1])
trackio.init(project=spec["project"], name=spec["run"], config=spec["config"],
             resume="allow" if spec["resume"] else "never", embed=False,
             auto_log_cpu=False, auto_log_gpu=False)
for step in spec["steps"]:
    trackio.log({"train/loss": 1.0 / (step + 1), "eval/energy_meanflow_1": 0.5 / (step + 1)}, step=step)
if spec["image"]:
    grid = trackio.Image(np.full((8, 8, 3), 200, dtype=np.uint8), caption="grid")
    trackio.log({"samples": grid}, step=spec["steps"][-1])
trackio.finish()
"""


def log_trackio(
    trackio_dir: Path,
    project: str,
    run: str,
    steps: list[int],
    resume: bool = False,
    image: bool = False,
    config: dict | None = None,
) -> None:
    """Log train/loss = 1/(step+1) for `steps` into a real trackio store (a subprocess)."""
    spec = {
        "project": project,
        "run": run,
        "steps": steps,
        "resume": resume,
        "image": image,
        "config": config or {"lr": 1e-3},
    }
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir)}
    subprocess.run([PYTHON, "-c", _LOG_SCRIPT, json.dumps(spec)], env=env, check=True, capture_output=True)


def trackio_metric(
    trackio_dir: Path, project: str, run: str, metric: str = "train/loss"
) -> list[tuple[int, float]]:
    """(step, value) pairs as `trackio get metric --json` reports them."""
    out = subprocess.run(
        [TRACKIO_CLI, "get", "metric", "--project", project, "--run", run, "--metric", metric, "--json"],
        env={**os.environ, "TRACKIO_DIR": str(trackio_dir)},
        capture_output=True,
        text=True,
        check=True,
    )
    return [(v["step"], v["value"]) for v in json.loads(out.stdout)["values"]]


def write_run(
    root: Path,
    name: str,
    archived: list[int],
    last_step: int,
    status: str = "finished",
    updated_ago: float = 3600.0,
    error: str | None = None,
    age: float = 3600.0,
) -> RunDir:
    """A run folder as zoo train leaves it: real checkpoints, heartbeat, metrics, config, eval.json."""
    run = RunDir(root / name)
    torch.manual_seed(len(name))
    model = torch.nn.Linear(16, 16)
    for step in [*archived, last_step]:
        payload = {"run_name": name, "step": step, "model": model.state_dict(), "config": {"run_name": name}}
        save_checkpoint(run.archive(step) if step in archived else run.last, payload)
    if last_step in archived:  # last.pt is refreshed at the final archived step too
        save_checkpoint(
            run.last, {"run_name": name, "step": last_step, "model": model.state_dict(), "config": {}}
        )
    run.config.write_text(f'run_name = "{name}"\n')
    for step in range(0, last_step + 1, 10):
        run.append_metrics({"step": step, "time": time.time(), "train/loss": 1.0 / (step + 1)})
    run.append_metrics(
        {
            "step": last_step,
            "time": time.time(),
            "eval/energy_meanflow_1": 0.25,
            "eval/energy_data_floor": 0.01,
        }
    )
    now = time.time()
    heartbeat = {
        "run_name": name,
        "status": status,
        "step": last_step,
        "loss": 1.0 / (last_step + 1),
        "error": error,
        "last_checkpoint": "last.pt",
        "checkpoint_step": last_step,
        "started": now - updated_ago - 600,
        "updated": now - updated_ago,
    }
    run.heartbeat.write_text(json.dumps(heartbeat))
    (run.samples).mkdir(exist_ok=True)
    (run.samples / "final.png").write_bytes(b"\x89PNG fake grid")
    for path in run.root.rglob("*"):
        os.utime(path, (now - age, now - age))
    return run


def test_fixtures_write_what_zoo_train_writes(tmp_path):
    run = write_run(tmp_path, "r1", archived=[10, 20], last_step=20)
    names = sorted(p.name for p in run.root.iterdir())
    assert names == [
        "config.toml",
        "heartbeat.json",
        "last.pt",
        "last.pt.sha256",
        "metrics.jsonl",
        "samples",
        "step_0000010.pt",
        "step_0000010.pt.sha256",
        "step_0000020.pt",
        "step_0000020.pt.sha256",
    ]
    assert torch.load(run.last, weights_only=True)["step"] == 20


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


def offline_modal(home: Path, monkeypatch) -> None:
    """A home without ~/.modal.toml, no token variables, and a Modal server that refuses
    connections (nothing reaches the network); the working folder is `home`."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(home / ".modal.toml"))
    monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{closed_port()}")
    for key in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(home)
