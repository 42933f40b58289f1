"""The remote machinery on run folders written by real `zoo train` runs (tiny moons, CPU).

1. A run made by the `zoo train` command plays a remote run on a Volume-layout directory:
   sync, listing, download and clean work on what the trainer really writes.
2. A supervised remote run is preempted (supervisor and training killed together, as when a
   container dies) and retried: the retry resumes the same run from its last checkpoint, the
   step counter continues, and trackio keeps logging into the same trackio run.
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from test_remote_fixtures import REPO, trackio_metric
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.checkpoints import load_checkpoint
from zoo.config.loading import config_to_dict, load_config
from zoo.remote.worker import RunPaths, read_attempts, supervise
from zoo_cli.main import app as zoo_app

runner = CliRunner()
TINY = TINY_RUN


def cli() -> typer.Typer:
    """The real `zoo` app, as installed."""
    return zoo_app


def env_with(trackio_dir: Path) -> dict[str, str]:
    return {**os.environ, "TRACKIO_DIR": str(trackio_dir), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """`zoo train moons ...` for 20 steps: outputs/moons-real and its trackio store."""
    base = tmp_path_factory.mktemp("zoo-train")
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
            "moons-real",
        ],
        cwd=base,
        env=env_with(base / "trackio"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base


@pytest.mark.slow
def test_sync_list_download_clean_a_run_written_by_zoo_train(trained, tmp_path):
    volume = tmp_path / "volume"
    shutil.copytree(trained / "outputs" / "moons-real", volume / "outputs" / "moons-real")
    shutil.copytree(trained / "trackio", volume / "trackio" / "moons-real")
    local_outputs, local_trackio = tmp_path / "outputs", tmp_path / "trackio"
    args = ["--volume-dir", str(volume), "--outputs", str(local_outputs)]

    synced = runner.invoke(cli(), ["sync", *args, "--trackio-dir", str(local_trackio)])
    assert synced.exit_code == 0, synced.output
    logged = [
        json.loads(line)
        for line in (trained / "outputs" / "moons-real" / "metrics.jsonl").read_text().splitlines()
    ]
    expected = [(r["step"], r["train/loss"]) for r in logged if "train/loss" in r]
    assert trackio_metric(local_trackio, "zoo", "moons-real@remote") == expected

    evaluation = json.loads((trained / "outputs" / "moons-real" / "eval.json").read_text())
    headline = next(r for r in evaluation["rows"] if (r["kind"], r["steps"]) == ("meanflow", 1))
    for listing_args in (["--local", "--outputs", str(local_outputs)], ["--remote", *args]):
        listed = runner.invoke(cli(), ["ckpts", *listing_args, "--json"])
        assert listed.exit_code == 0, listed.output
        (run,) = json.loads(listed.output)
        assert run["run"] == "moons-real" and run["state"] == "finished" and run["step"] == 20
        assert run["key_metric"] == ["eval/energy_meanflow_1", pytest.approx(headline["energy_distance"])]
        assert {c["name"] for c in run["checkpoints"]} == {"last.pt", "step_0000020.pt"}

    # The real local run, listed where zoo train left it: last.pt's step read from the file.
    local = json.loads(
        runner.invoke(cli(), ["ckpts", "--local", "--outputs", str(trained / "outputs"), "--json"]).output
    )
    assert [(c["name"], c["step"]) for c in local[0]["checkpoints"]] == [
        ("last.pt", 20),
        ("step_0000020.pt", 20),
    ]

    fetched = runner.invoke(cli(), ["ckpts", "download", "moons-real", *args])
    assert fetched.exit_code == 0, fetched.output
    payload = load_checkpoint(local_outputs / "moons-real@remote" / "last.pt")
    assert payload["step"] == 20 and payload["run_name"] == "moons-real"

    cleaned = runner.invoke(cli(), ["clean", "moons-real", "--remote", "--volume-dir", str(volume), "--yes"])
    assert cleaned.exit_code == 0, cleaned.output
    # Its only archive is the one eval.json names: kept, with last.pt.
    assert sorted(p.name for p in (volume / "outputs" / "moons-real").glob("*.pt")) == [
        "last.pt",
        "step_0000020.pt",
    ]


SUPERVISE = """
import json, sys
from pathlib import Path
from zoo.remote.worker import supervise
volume, work, config = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
supervise(volume, config, "sub-1", resume=False, nproc=1, commit=lambda: None, work_dir=work,
          commit_every=0.2)
"""


def trackio_run_ids(database: Path) -> set[str]:
    """The trackio runs in the supervisor's copy on the Volume (trackio.init records the run at once)."""
    if not database.exists():
        return set()
    try:
        with sqlite3.connect(database) as conn:
            return {r for (r,) in conn.execute("SELECT run_id FROM configs")}
    except sqlite3.OperationalError:  # created, tables not there yet
        return set()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_preempted_remote_run_resumes_itself_and_its_step_counter(tmp_path):
    # Enough steps that the kill lands mid-run even on a quiet, fast machine (40 steps could all
    # finish before the first checkpoint was noticed); few checkpoints, each of which draws the
    # loss curve (TINY's one every 10 steps made that most of the test's time).
    STEPS, SAVE_EVERY = 400, 100
    volume = tmp_path / "volume"
    run = "moons-preempted"
    overrides = [f"run_name={run}", f"output_dir={volume / 'outputs'}", f"train.steps={STEPS}"]
    cfg = load_config("moons", [*TINY, *overrides, f"train.save_every={SAVE_EVERY}"])
    (volume / "remote" / run).mkdir(parents=True)
    (volume / "remote" / run / "submission.json").write_text(
        json.dumps({"submission_id": "sub-1", "retries": 3})
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config_to_dict(cfg)))
    paths = RunPaths(volume, run)

    # Attempt 1: a whole container (supervisor + training) that dies after its first checkpoint.
    (tmp_path / "work1").mkdir()
    first = subprocess.Popen(
        [sys.executable, "-c", SUPERVISE, str(volume), str(tmp_path / "work1"), str(config_file)],
        env=env_with(tmp_path / "unused"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: paths.run_dir.last.exists() and trackio_run_ids(paths.trackio / "zoo.db"),
            120,
            "a checkpoint",
        )
        (first_run_id,) = trackio_run_ids(paths.trackio / "zoo.db")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # preemption: no code of the container runs after this
        first.wait()
    killed_at = load_checkpoint(paths.run_dir.last)["step"]
    assert SAVE_EVERY <= killed_at < STEPS
    assert json.loads(paths.run_dir.heartbeat.read_text())["status"] == "running"  # it never got to say more

    # Attempt 2: Modal retries the same input in a new container.
    (tmp_path / "work2").mkdir()
    outcome = supervise(volume, config_to_dict(cfg), "sub-1", False, 1, lambda: None, tmp_path / "work2")
    assert outcome == {"run_name": run, "status": "finished", "attempt": 2}
    starts = [a for a in read_attempts(paths) if a["event"] == "start"]
    assert [(a["attempt"], a["resume"], a["from_step"]) for a in starts] == [
        (1, False, None),
        (2, True, killed_at),
    ]
    beat = json.loads(paths.run_dir.heartbeat.read_text())
    assert beat["status"] == "finished" and beat["step"] == STEPS

    # The step counter went on from the checkpoint: no record of attempt 2 restarts below it.
    # (Steps attempt 1 logged after its checkpoint are logged again by attempt 2: one step back at most.)
    records = [json.loads(line) for line in paths.run_dir.metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    restarts = [steps[i] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) <= 1 and all(step > killed_at for step in restarts)
    assert steps[-1] == STEPS

    # One trackio run across both attempts: the retry restored the Volume's copy and resumed that
    # run (rows logged after the last copy are lost with the container, as on Modal).
    with sqlite3.connect(paths.trackio / "zoo.db") as conn:
        run_ids = {r for (r,) in conn.execute("SELECT run_id FROM metrics UNION SELECT run_id FROM configs")}
        logged_steps = [s for (s,) in conn.execute("SELECT DISTINCT step FROM metrics ORDER BY step")]
    assert len(run_ids) == 1 and run_ids == {first_run_id} and logged_steps[-1] == STEPS
    assert "attempt 2" in (paths.registry / "train.log").read_text()
