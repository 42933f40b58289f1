"""`zoo clean`: list first, delete only with --yes, never last.pt, never a run being written."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import typer
from test_remote_fixtures import write_run
from typer.testing import CliRunner

from zoo.checkpoints import load_checkpoint, save_checkpoint
from zoo.remote.clean import CleanError, check_pattern, execute_clean, matches_everything, plan_clean
from zoo.remote.store import LocalDirStore
from zoo.runs import RunDir
from zoo_cli.main import app as zoo_app

runner = CliRunner()


def cli() -> typer.Typer:
    """The real `zoo` app, as installed."""
    return zoo_app


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def outputs(tmp_path) -> Path:
    root = tmp_path / "outputs"
    write_run(root, "cifar-a", archived=[100, 200, 300], last_step=300)
    write_run(root, "cifar-b", archived=[50], last_step=80)
    write_run(root, "moons-x", archived=[10, 20], last_step=20)
    return root


def files(root: Path) -> set[str]:
    """Checkpoint files (their .sha256 companions go and stay with them, counted in the totals)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*.pt*") if not p.name.endswith(".sha256")}


@pytest.mark.parametrize("pattern", ["*", "**", "?*", "*?"])
def test_patterns_that_match_everything_need_all(pattern):
    assert matches_everything(pattern)
    with pytest.raises(CleanError, match="--all"):
        check_pattern(pattern, allow_all=False)
    assert check_pattern(pattern, allow_all=True) == "*"


def test_no_pattern_needs_all_and_literal_patterns_pass():
    with pytest.raises(CleanError):
        check_pattern(None, allow_all=False)
    assert not matches_everything("cifar-*") and check_pattern("cifar-*", False) == "cifar-*"


def test_dry_run_lists_and_frees_nothing(outputs):
    before = files(outputs)
    result = runner.invoke(cli(), ["clean", "cifar-*", "--keep-last", "1", "--outputs", str(outputs)])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "step_0000100.pt" in text and "step_0000200.pt" in text and "step_0000300.pt" not in text
    assert "4 file(s)" in text and "dry run: nothing deleted" in text  # 2 checkpoints + their sha256
    assert "would delete" in text
    assert files(outputs) == before


def test_yes_deletes_old_archives_and_keeps_every_last_pt(outputs):
    result = runner.invoke(cli(), ["clean", "cifar-*", "--outputs", str(outputs), "--yes"])
    assert result.exit_code == 0, result.output
    assert files(outputs) == {
        "cifar-a/last.pt",
        "cifar-b/last.pt",
        "moons-x/last.pt",
        "moons-x/step_0000010.pt",
        "moons-x/step_0000020.pt",
    }
    assert "deleted 8 file(s)" in flat(result.output)  # 4 checkpoints + their sha256
    assert "deleting (" in flat(result.output) and "would delete" not in flat(result.output)
    assert load_checkpoint(outputs / "cifar-a" / "last.pt")["step"] == 300


def test_clean_refuses_everything_patterns_without_all(outputs):
    before = files(outputs)
    for args in (["clean"], ["clean", "*"]):
        result = runner.invoke(cli(), [*args, "--outputs", str(outputs), "--yes"])
        assert result.exit_code == 2 and "--all" in flat(result.output)
    assert files(outputs) == before
    result = runner.invoke(cli(), ["clean", "--all", "--keep-last", "1", "--outputs", str(outputs), "--yes"])
    assert result.exit_code == 0 and "deleted 6 file(s)" in flat(result.output)  # 3 checkpoints + sha256


def test_a_glob_that_happens_to_select_every_run_needs_all(outputs):
    before = files(outputs)
    for pattern in ("*-*", "[cm]*", "*-?"):  # not "*", yet every run here matches
        result = runner.invoke(cli(), ["clean", pattern, "--outputs", str(outputs), "--yes"])
        assert result.exit_code == 2 and "selects every run (3)" in flat(result.output), pattern
        assert f"pattern {pattern!r}" in flat(result.output)  # "[cm]" shown as typed, not read as markup
    assert files(outputs) == before
    allowed = runner.invoke(
        cli(), ["clean", "*-*", "--all", "--keep-last", "1", "--outputs", str(outputs), "--yes"]
    )
    assert allowed.exit_code == 0 and "deleted 6 file(s)" in flat(allowed.output)


def test_a_literal_name_may_select_the_only_run(tmp_path):
    write_run(tmp_path, "solo", archived=[10, 20], last_step=20)
    store = LocalDirStore(tmp_path)
    assert plan_clean(store, "", "solo", keep_last=0).runs_matched == ["solo"]
    with pytest.raises(CleanError, match="selects every run"):
        plan_clean(store, "", "s*", keep_last=0)
    assert plan_clean(store, "", "s*", keep_last=0, allow_all=True).runs_matched == ["solo"]


def test_runs_being_written_and_interrupted_writes(outputs):
    write_run(
        outputs, "cifar-live", archived=[10, 20], last_step=20, status="running", updated_ago=20, age=20
    )
    leftover = outputs / "cifar-b" / ".last.pt.tmp-999"
    leftover.write_bytes(b"half a checkpoint")  # a write that died an hour ago
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    result = runner.invoke(cli(), ["clean", "cifar-*", "--outputs", str(outputs), "--yes"])
    text = flat(result.output)
    assert "skipping cifar-live: still being written (heartbeat 20s ago)" in text
    assert (outputs / "cifar-live" / "step_0000010.pt").exists()
    assert not (outputs / "cifar-b" / ".last.pt.tmp-999").exists()


def test_a_run_without_heartbeat_yet_but_fresh_files_is_left_alone(tmp_path):
    run = RunDir(tmp_path / "fresh")
    for step in (1, 2):
        save_checkpoint(run.archive(step), {"run_name": "fresh", "step": step, "model": {}})
    plan = plan_clean(LocalDirStore(tmp_path), "", "fresh", keep_last=0)
    assert plan.deletions == [] and plan.skipped[0][1].startswith("still being written (a file changed")


def test_clean_races_a_writer(tmp_path):
    """A run starts writing between the listing and the deletion: execute re-checks and keeps it."""
    root = tmp_path / "outputs"
    write_run(root, "race", archived=[10, 20, 30], last_step=30)
    store = LocalDirStore(root)
    plan = plan_clean(store, "", "race", keep_last=0)
    assert len(plan.deletions) == 6  # 3 checkpoints and their sha256 files

    run = RunDir(root / "race")
    stop = threading.Event()
    errors: list[BaseException] = []
    model = torch.nn.Linear(16, 16)

    def writer() -> None:  # what the trainer does: heartbeat, then last.pt and archives, atomically
        step = 30
        try:
            while not stop.is_set():
                step += 1
                run.write_heartbeat(status="running", step=step, loss=0.1)
                payload = {"run_name": "race", "step": step, "model": model.state_dict()}
                save_checkpoint(run.last, payload)
                save_checkpoint(run.archive(step), payload)
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while run.read_heartbeat()["status"] != "running":
            time.sleep(0.01)
        result = execute_clean(store, plan, "")
        again = plan_clean(store, "", "race", keep_last=0)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    # The heartbeat names this (live) process on this machine.
    assert result.deleted == [] and result.skipped[0][1].startswith("being trained by process")
    assert again.deletions == [] and again.skipped
    assert all(run.archive(s).exists() for s in (10, 20, 30))
    assert load_checkpoint(run.last)["step"] > 30


def test_files_changed_since_the_listing_are_kept(tmp_path):
    root = tmp_path / "outputs"
    run = write_run(root, "old", archived=[10, 20], last_step=20)
    store = LocalDirStore(root)
    plan = plan_clean(store, "", "old", keep_last=0)
    save_checkpoint(run.archive(10), {"run_name": "old", "step": 10, "model": {}, "note": "rewritten"})
    past = time.time() - 3600
    os.utime(run.archive(10), (past + 5, past + 5))  # changed, yet not recent enough to mark the run live
    result = execute_clean(store, plan, "")
    assert [Path(d.path).name for d in result.deleted] == ["step_0000020.pt", "step_0000020.pt.sha256"]
    assert "changed since it was listed" in result.skipped[0][1] and run.archive(10).exists()


def test_remote_clean_uses_the_volume_layout(tmp_path):
    volume = tmp_path / "volume"
    write_run(volume / "outputs", "far", archived=[1, 2, 3], last_step=3)
    result = runner.invoke(
        cli(), ["clean", "far", "--remote", "--volume-dir", str(volume), "--keep-last", "2", "--yes"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (volume / "outputs" / "far").glob("*.pt")) == [
        "last.pt",
        "step_0000002.pt",
        "step_0000003.pt",
    ]
    assert json.loads((volume / "outputs" / "far" / "heartbeat.json").read_text())["status"] == "finished"


def test_the_checkpoint_named_in_eval_json_is_kept(tmp_path):
    """A run as zoo train leaves it: eval.json names the archive its final evaluation used."""
    from tiny_runs import TINY_RUN

    from zoo.config.loading import load_config
    from zoo.training.trainer import train_run

    overrides = ["train.steps=15", "train.archive_every=5", "tracking.enabled=false", "run_name=evald"]
    run = train_run(load_config("moons", [*TINY_RUN, *overrides, f"output_dir={tmp_path}"]))
    evaluated = json.loads(run.eval_json.read_text())["checkpoint"]
    assert evaluated == "step_0000015.pt" and run.archive(15).exists()
    result = runner.invoke(cli(), ["clean", "evald", "--keep-last", "0", "--outputs", str(tmp_path), "--yes"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.root.glob("*.pt")) == ["last.pt", evaluated]
