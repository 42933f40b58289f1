"""`zoo sync` on two plain directories: one with the Modal Volume's layout, one local store.

Real trackio databases (written by trackio in subprocesses) and real checkpoints; the result
is read back through trackio's own CLI.
"""

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
import typer
from test_remote_fixtures import log_trackio, trackio_metric, write_run
from typer.testing import CliRunner

from zoo.remote.layout import mirror_name
from zoo.remote.store import LocalDirStore
from zoo.remote.sync import SYNC_STATE, execute_sync, plan_sync
from zoo.remote.trackio_merge import merge_database
from zoo_cli.main import app as zoo_app

runner = CliRunner()


def cli() -> typer.Typer:
    """The real `zoo` app, as installed."""
    return zoo_app


@pytest.fixture
def stores(tmp_path):
    volume = tmp_path / "volume"
    (volume / "outputs").mkdir(parents=True)
    return volume, tmp_path / "outputs", tmp_path / "trackio-local"


def sync_once(volume: Path, outputs: Path, trackio: Path, patterns=None):
    remote = LocalDirStore(volume, label="remote")
    return execute_sync(remote, plan_sync(remote, outputs, patterns), outputs, trackio, patterns)


def metric_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT run_name, step, log_id FROM metrics ORDER BY run_name, step, log_id"
        ).fetchall()


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sync_three_times_adds_nothing_after_the_first(stores):
    volume, outputs, local_trackio = stores
    write_run(volume / "outputs", "moons-a", archived=[10, 20], last_step=20)
    log_trackio(volume / "trackio" / "moons-a", "zoo", "moons-a", steps=[0, 10, 20], image=True)
    log_trackio(local_trackio, "zoo", "local-run", steps=[0, 5])
    remote_db = volume / "trackio" / "moons-a" / "zoo.db"
    an_hour_ago = time.time() - 3600
    os.utime(remote_db, (an_hour_ago, an_hour_ago))  # a finished run's database, last written an hour ago

    first = sync_once(volume, outputs, local_trackio)
    assert first.runs == ["moons-a"] and first.files_copied == 4
    assert first.merges[0].metrics_added == 4 and first.media_copied == 1  # 3 steps + the image row
    mirror = outputs / "moons-a@remote"
    synced = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file())
    assert synced == [
        ".zoo-remote.json",
        "config.toml",
        "heartbeat.json",
        "metrics.jsonl",
        "samples/final.png",
    ]
    manifest = json.loads((mirror / ".zoo-remote.json").read_text())
    assert [c["name"] for c in manifest["checkpoints"]] == ["last.pt", "step_0000010.pt", "step_0000020.pt"]
    rows_after_first = metric_rows(local_trackio / "zoo.db")
    files_after_first = tree_digest(mirror)

    for _ in range(2):
        again = sync_once(volume, outputs, local_trackio)
        assert (again.files_copied, again.rows_added, again.media_copied) == (0, 0, 0)
        assert again.merges == []  # unchanged since merged: not even downloaded again
    # Merging the same database again (what a sync does when it cannot tell) adds nothing either.
    assert merge_database(remote_db, local_trackio / "zoo.db", rename=mirror_name).rows_added == 0
    assert metric_rows(local_trackio / "zoo.db") == rows_after_first
    files_now = tree_digest(mirror)
    files_now.pop(".zoo-remote.json"), files_after_first.pop(".zoo-remote.json")  # only its sync time moves
    assert files_now == files_after_first

    # The synced run reads back through trackio, media path included; the local run is intact.
    assert trackio_metric(local_trackio, "zoo", "moons-a@remote") == [(0, 1.0), (10, 1 / 11), (20, 1 / 21)]
    image_rows = [r for r in metric_rows(local_trackio / "zoo.db") if r[0] == "moons-a@remote"]
    assert len(image_rows) == 4
    media = list((local_trackio / "media" / "zoo" / "moons-a@remote").rglob("*.png"))
    assert len(media) == 1
    with sqlite3.connect(local_trackio / "zoo.db") as conn:
        stored = [
            json.loads(m)
            for (m,) in conn.execute(
                "SELECT metrics FROM metrics WHERE CAST(metrics AS TEXT) LIKE '%file_path%'"
            )
        ]
    assert stored[0]["samples"]["file_path"] == media[0].relative_to(local_trackio / "media").as_posix()
    assert sorted(r[1] for r in metric_rows(local_trackio / "zoo.db") if r[0] == "local-run") == [0, 5]


def test_a_run_still_logging_remotely_brings_only_its_new_records(stores):
    volume, outputs, local_trackio = stores
    remote_trackio = volume / "trackio" / "live"
    run = write_run(
        volume / "outputs", "live", archived=[], last_step=40, status="running", updated_ago=5, age=5
    )
    log_trackio(remote_trackio, "zoo", "live", steps=[0, 10, 20, 30, 40])
    first = sync_once(volume, outputs, local_trackio)
    assert first.merges[0].metrics_added == 5

    # The run goes on: more trackio rows (same trackio run), more metrics lines, a new heartbeat.
    log_trackio(remote_trackio, "zoo", "live", steps=[50, 60], resume=True)
    run.append_metrics({"step": 60, "time": time.time(), "train/loss": 1 / 61})
    run.write_heartbeat(status="running", step=60, loss=1 / 61)
    second = sync_once(volume, outputs, local_trackio)
    assert second.merges[0].metrics_added == 2
    assert second.files_copied == 2  # metrics.jsonl and heartbeat.json changed, nothing else
    values = trackio_metric(local_trackio, "zoo", "live@remote")
    assert [s for s, _ in values] == [0, 10, 20, 30, 40, 50, 60]
    mirror = outputs / "live@remote"
    assert (mirror / "metrics.jsonl").read_bytes() == run.metrics.read_bytes()
    assert json.loads((mirror / "heartbeat.json").read_text())["step"] == 60


@pytest.mark.parametrize("synced_before_the_retry", [True, False])
def test_steps_logged_again_after_a_retry_arrive_once(stores, synced_before_the_retry):
    """A retry resumes from the checkpoint at step 20 and logs steps 30 and 40 a second time."""
    volume, outputs, local_trackio = stores
    remote_trackio = volume / "trackio" / "retried"
    write_run(
        volume / "outputs", "retried", archived=[], last_step=60, status="running", updated_ago=5, age=5
    )
    log_trackio(remote_trackio, "zoo", "retried", steps=[0, 10, 20, 30, 40], image=True)
    if synced_before_the_retry:
        assert sync_once(volume, outputs, local_trackio).merges[0].metrics_added == 6  # 5 steps + the image
    log_trackio(
        remote_trackio, "zoo", "retried", steps=[30, 40], resume=True, image=True
    )  # the step-40 grid again
    log_trackio(remote_trackio, "zoo", "retried", steps=[50, 60], resume=True)

    merged = sync_once(volume, outputs, local_trackio).merges[0]
    values = trackio_metric(local_trackio, "zoo", "retried@remote")
    assert [step for step, _ in values] == [0, 10, 20, 30, 40, 50, 60]
    images = [
        r for r in metric_rows(local_trackio / "zoo.db") if r[0] == "retried@remote" and r[1] in (40, 60)
    ]
    assert [step for _, step, _ in images] == [
        40,
        40,
        60,
    ]  # step 40: its train record and its grid, once each
    with sqlite3.connect(remote_trackio / "zoo.db") as conn:
        newest = conn.execute("SELECT log_id FROM metrics WHERE step = 30").fetchall()[-1][0]
    assert newest in {log_id for _, step, log_id in metric_rows(local_trackio / "zoo.db") if step == 30}
    assert merged.metrics_replaced == (3 if synced_before_the_retry else 0)  # steps 30, 40 and the grid
    again = sync_once(volume, outputs, local_trackio)
    assert again.rows_added == 0


def test_a_remote_run_never_clobbers_a_local_run_of_the_same_name(stores, tmp_path):
    volume, outputs, local_trackio = stores
    write_run(outputs, "moons-a", archived=[100], last_step=200)
    log_trackio(local_trackio, "zoo", "moons-a", steps=[100, 200])
    local_before = tree_digest(outputs / "moons-a")
    write_run(volume / "outputs", "moons-a", archived=[10], last_step=20)
    log_trackio(volume / "trackio" / "moons-a", "zoo", "moons-a", steps=[0, 10, 20])

    sync_once(volume, outputs, local_trackio)

    assert tree_digest(outputs / "moons-a") == local_before
    assert (outputs / "moons-a@remote" / "heartbeat.json").exists()
    assert [s for s, _ in trackio_metric(local_trackio, "zoo", "moons-a")] == [100, 200]
    assert [s for s, _ in trackio_metric(local_trackio, "zoo", "moons-a@remote")] == [0, 10, 20]


def test_a_run_interrupted_mid_write_syncs_what_is_whole(stores):
    volume, outputs, local_trackio = stores
    run = write_run(
        volume / "outputs", "cut", archived=[10], last_step=10, status="running", updated_ago=3600
    )
    (run.root / ".last.pt.tmp-4242").write_bytes(run.last.read_bytes()[:1000])  # a checkpoint write cut short
    with open(run.metrics, "a") as handle:
        handle.write('{"step": 20, "train/lo')  # a metrics line cut short
    log_trackio(volume / "trackio" / "good", "zoo", "good", steps=[0, 1])
    log_trackio(volume / "trackio" / "cut", "zoo", "cut", steps=[0, 1, 2])
    whole = (volume / "trackio" / "cut" / "zoo.db").read_bytes()
    (volume / "trackio" / "cut" / "zoo.db").write_bytes(whole[: len(whole) // 2])  # copied mid-write

    report = sync_once(volume, outputs, local_trackio)

    assert len(report.warnings) == 1 and "trackio/cut/zoo.db" in report.warnings[0]
    assert [s for s, _ in trackio_metric(local_trackio, "zoo", "good@remote")] == [0, 1]
    with sqlite3.connect(local_trackio / "zoo.db") as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    mirror = outputs / "cut@remote"
    assert not list(mirror.glob(".*tmp*")) and (mirror / "metrics.jsonl").exists()

    # Once the remote copy is whole again, the next sync takes it.
    (volume / "trackio" / "cut" / "zoo.db").write_bytes(whole)
    later = sync_once(volume, outputs, local_trackio)
    assert not later.warnings and later.merges[0].metrics_added == 3
    assert json.loads((local_trackio / SYNC_STATE).read_text())


def test_zoo_sync_command_and_listing_of_synced_runs(stores):
    volume, outputs, local_trackio = stores
    write_run(volume / "outputs", "far", archived=[10, 20], last_step=20)
    log_trackio(volume / "trackio" / "far", "zoo", "far", steps=[0, 20])
    (volume / "remote" / "far").mkdir(parents=True)
    (volume / "remote" / "far" / "submission.json").write_text(
        json.dumps({"submitted": time.time() - 7200, "gpu": "H100"})
    )
    args = ["--volume-dir", str(volume), "--outputs", str(outputs)]

    result = runner.invoke(cli(), ["sync", *args, "--trackio-dir", str(local_trackio)])
    assert result.exit_code == 0, result.output
    assert "synced 1 remote run" in result.output and "trackio rows: zoo.db +2;" in result.output
    again = runner.invoke(cli(), ["sync", *args, "--trackio-dir", str(local_trackio)])
    assert "run files: 0 new" in again.output and "trackio rows: none new" in again.output

    # Offline listing (no token): the synced copy stands in for the remote run.
    listing = runner.invoke(cli(), ["ckpts", "--local", "--outputs", str(outputs), "--json"])
    assert listing.exit_code == 0, listing.output
    (far,) = json.loads(listing.output)
    assert far["run"] == "far" and far["where"].startswith("remote (synced")
    assert far["state"] == "finished" and far["key_metric"] == ["eval/energy_meanflow_1", 0.25]
    assert [(c["name"], c["step"], c["where"]) for c in far["checkpoints"]] == [
        ("last.pt", 20, "remote"),
        ("step_0000020.pt", 20, "remote"),
        ("step_0000010.pt", 10, "remote"),
    ]


def test_sync_only_the_runs_asked_for(stores):
    volume, outputs, local_trackio = stores
    for run in ("alpha-1", "beta-1"):
        write_run(volume / "outputs", run, archived=[], last_step=10)
        log_trackio(volume / "trackio" / run, "zoo", run, steps=[0, 10])
    first = sync_once(volume, outputs, local_trackio, patterns=["alpha-*"])
    assert first.runs == ["alpha-1"] and sorted(p.name for p in outputs.iterdir()) == ["alpha-1@remote"]
    assert {r[0] for r in metric_rows(local_trackio / "zoo.db")} == {"alpha-1@remote"}
    everything = sync_once(volume, outputs, local_trackio)
    assert everything.runs == ["alpha-1", "beta-1"]
    assert {r[0] for r in metric_rows(local_trackio / "zoo.db")} == {"alpha-1@remote", "beta-1@remote"}
    assert len(metric_rows(local_trackio / "zoo.db")) == 4


def test_sync_of_an_empty_volume_says_so(stores):
    volume, outputs, local_trackio = stores
    result = runner.invoke(
        cli(),
        ["sync", "--volume-dir", str(volume), "--outputs", str(outputs), "--trackio-dir", str(local_trackio)],
    )
    assert result.exit_code == 0 and "no remote runs" in result.output
    assert not outputs.exists() or not any(outputs.iterdir())


def test_sync_from_a_missing_volume_dir_fails_clearly(tmp_path):
    result = runner.invoke(cli(), ["sync", "--volume-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "is not a directory" in " ".join(result.output.split())
