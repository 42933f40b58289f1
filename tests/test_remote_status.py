"""Run states from heartbeats: running, finished, failed (with the cause), stalled, stopped, pending.

A run killed without a word must not appear to run for hours: a run whose heartbeat stops is
stalled after --stall-after, and a recorded failure is shown with its cause.
"""

import json
import time

import pytest
from test_remote_fixtures import write_run
from typer.testing import CliRunner

from zoo.remote.status import CallState, format_duration, parse_duration, run_status
from zoo_cli.main import app as zoo_app

runner = CliRunner()
NOW = 1_800_000_000.0


def beat(status: str, updated_ago: float, **extra) -> dict:
    return {
        "status": status,
        "updated": NOW - updated_ago,
        "started": NOW - 5000,
        "step": 700,
        "loss": 0.3,
        **extra,
    }


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("1h30m", 5400),
        ("2d", 172800),
        ("45", 45),
        (" 1.5h ", 5400),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5m", "0"])
def test_parse_duration_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (5, 600, 3 * 3600 + 120, 3 * 86400)] == ["5s", "10m", "3h02m", "3.0d"]


def test_a_fresh_heartbeat_is_running_and_an_old_one_is_stalled():
    assert run_status(beat("running", 60), NOW, stall_after=900).state == "running"
    stalled = run_status(beat("running", 1800), NOW, stall_after=900)
    assert (
        stalled.state == "stalled"
        and "no heartbeat for 30m" in stalled.detail
        and "SIGKILL" in stalled.detail
    )
    assert stalled.step == 700 and stalled.elapsed == pytest.approx(5000)
    assert run_status(beat("running", 1800), NOW, stall_after=3600).state == "running"  # configurable


def test_failures_carry_their_cause_and_the_retry_plan():
    failed = run_status(beat("failed", 10, error="OutOfMemoryError: CUDA out of memory"), NOW)
    assert failed.state == "failed" and failed.detail.startswith("OutOfMemoryError")
    retrying = run_status(beat("failed", 10, error="RuntimeError: NCCL", retrying=True, attempt=2), NOW)
    assert "attempt 2" in retrying.detail and "resuming from the last checkpoint" in retrying.detail
    # Finished and failed runs do not go stale: their heartbeat stops on purpose.
    assert run_status(beat("finished", 10**6), NOW).state == "finished"
    assert run_status(beat("failed", 10**6, error="x"), NOW).state == "failed"


def test_remote_states_without_a_heartbeat():
    assert run_status(None, NOW, 900, submitted_at=NOW - 60).state == "pending"
    never = run_status(None, NOW, 900, submitted_at=NOW - 3600)
    assert never.state == "stalled" and "never started training" in never.detail
    crashed = run_status(
        None, NOW, 900, submitted_at=NOW - 3600, call=CallState("failed", "ImageBuildError: pip")
    )
    assert crashed.state == "failed" and "ImageBuildError" in crashed.detail
    assert run_status(None, NOW, 900, submitted_at=NOW - 60, stopped_at=NOW - 30).state == "stopped"
    assert run_status(None, NOW).state == "unknown"


def test_a_stale_heartbeat_with_a_failed_call_is_a_failure_not_a_stall():
    status = run_status(
        beat("running", 3600), NOW, 900, call=CallState("failed", "FunctionTimeoutError: 12h")
    )
    assert status.state == "failed" and "FunctionTimeoutError" in status.detail
    stopped = run_status(beat("running", 3600), NOW, 900, stopped_at=NOW - 100)
    assert stopped.state == "stopped"


def test_a_stop_is_superseded_by_a_later_submission():
    # Stopped at NOW-1000, resumed (submitted again) at NOW-900; the resumed attempt beats.
    resumed = run_status(beat("running", 30), NOW, 900, submitted_at=NOW - 900, stopped_at=NOW - 1000)
    assert resumed.state == "running"
    waiting = run_status(None, NOW, 900, submitted_at=NOW - 60, stopped_at=NOW - 1000)
    assert waiting.state == "pending"
    # Stopped after the latest submission: stopped, even while its heartbeat still looks fresh.
    assert (
        run_status(beat("running", 30), NOW, 900, submitted_at=NOW - 900, stopped_at=NOW - 60).state
        == "stopped"
    )
    # The cancelled container's supervisor records the interruption as a failure: that is the stop.
    after = beat("failed", 20, error="InputCancellation: cancelled", retrying=True, attempt=1)
    assert run_status(after, NOW, 900, submitted_at=NOW - 900, stopped_at=NOW - 60).state == "stopped"
    # A failure before the stop keeps its cause.
    before = beat("failed", 100, error="OutOfMemoryError: CUDA out of memory")
    assert run_status(before, NOW, 900, submitted_at=NOW - 900, stopped_at=NOW - 60).state == "failed"


def submit_record(volume, run, submitted_ago, gpu="A100-80GB"):
    folder = volume / "remote" / run
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "submission_id": run,
        "submitted": time.time() - submitted_ago,
        "gpu": gpu,
        "command": f"zoo modal submit {run}",
        "call_id": None,
        "app_name": f"zoo-{run}",
    }
    (folder / "submission.json").write_text(json.dumps(record))


def test_zoo_modal_status_on_a_volume_layout(tmp_path):
    volume = tmp_path / "volume"
    outputs = volume / "outputs"
    write_run(outputs, "ok", archived=[20], last_step=20)
    write_run(outputs, "live", archived=[], last_step=30, status="running", updated_ago=30, age=30)
    write_run(
        outputs,
        "oom",
        archived=[],
        last_step=10,
        status="failed",
        error="OutOfMemoryError: CUDA out of memory",
    )
    write_run(outputs, "frozen", archived=[], last_step=40, status="running", updated_ago=1800)
    for run in ("ok", "live", "oom", "frozen"):
        submit_record(volume, run, 7200)
    submit_record(volume, "queued", 30)

    app = zoo_app
    result = runner.invoke(app, ["modal", "status", "--volume-dir", str(volume), "--json"])
    assert result.exit_code == 0, result.output
    states = {r["run"]: (r["state"], r["step"]) for r in json.loads(result.output)}
    assert states == {
        "frozen": ("stalled", 40),
        "live": ("running", 30),
        "ok": ("finished", 20),
        "oom": ("failed", 10),
        "queued": ("pending", None),
    }
    table = runner.invoke(app, ["modal", "status", "--volume-dir", str(volume)])
    text = " ".join(table.output.split())
    assert "oom failed: OutOfMemoryError: CUDA out of memory" in text
    assert "frozen stalled: no heartbeat for 30m" in text

    relaxed = runner.invoke(
        app, ["modal", "status", "--volume-dir", str(volume), "--stall-after", "2h", "--json"]
    )
    assert {r["run"]: r["state"] for r in json.loads(relaxed.output)}["frozen"] == "running"
    one = runner.invoke(app, ["modal", "status", "oom", "--volume-dir", str(volume)])
    assert one.exit_code == 0 and "zoo modal submit oom" in " ".join(one.output.split())
    missing = runner.invoke(app, ["modal", "status", "nope", "--volume-dir", str(volume)])
    assert missing.exit_code == 1 and "no remote run 'nope'" in " ".join(missing.output.split())
    bad = runner.invoke(app, ["modal", "status", "--volume-dir", str(volume), "--stall-after", "soon"])
    assert bad.exit_code == 2


def test_status_shows_the_phase_of_a_live_run(tmp_path):
    evaluating = run_status(beat("running", 60, phase="eval"), NOW, stall_after=900)
    assert (evaluating.state, evaluating.phase) == ("running", "eval")
    stalled = run_status(beat("running", 1800, phase="eval"), NOW, stall_after=900)
    assert stalled.state == "stalled" and "no heartbeat for 30m (limit 15m) in phase 'eval'" in stalled.detail
    assert run_status(beat("finished", 60, phase="eval"), NOW).phase is None  # ended: no phase

    volume = tmp_path / "volume"
    run = write_run(volume / "outputs", "ev", archived=[], last_step=40, status="running", updated_ago=20)
    run.heartbeat.write_text(json.dumps({**json.loads(run.heartbeat.read_text()), "phase": "eval"}))
    submit_record(volume, "ev", 600)
    as_json = runner.invoke(zoo_app, ["modal", "status", "--volume-dir", str(volume), "--json"])
    assert [(r["state"], r["phase"]) for r in json.loads(as_json.output)] == [("running", "eval")]
    table = runner.invoke(zoo_app, ["modal", "status", "--volume-dir", str(volume)], env={"COLUMNS": "200"})
    assert "running (eval)" in table.output


def test_a_heartbeat_older_than_the_latest_submission_is_the_previous_attempts():
    # Resumed 60 s ago; the heartbeat is the earlier attempt's (failed, finished, or stale).
    for old in (beat("failed", 600, error="RuntimeError: x"), beat("finished", 600), beat("running", 3600)):
        waiting = run_status(old, NOW, 900, submitted_at=NOW - 60)
        assert waiting.state == "pending" and "waiting for the container" in waiting.detail
        assert waiting.step == old["step"]
    # The call lookup still names a failure the new container could not write down.
    lookup = CallState("failed", "ImportError")
    crashed = run_status(beat("finished", 600), NOW, 900, submitted_at=NOW - 60, call=lookup)
    assert (crashed.state, crashed.detail) == ("failed", "ImportError")
    # Within the clocks' disagreement the heartbeat counts as the new container's.
    assert run_status(beat("running", 70), NOW, 900, submitted_at=NOW - 60).state == "running"


def test_a_retrying_failure_then_stopped_is_stopped_with_its_last_error():
    failed = beat("failed", 100, error="RuntimeError: NCCL", retrying=True, attempt=2)
    status = run_status(failed, NOW, 900, submitted_at=NOW - 900, stopped_at=NOW - 60)
    assert status.state == "stopped" and "(last error: RuntimeError: NCCL)" in status.detail
    assert "Modal retries it" not in status.detail


def test_an_interrupted_run_is_stopped_with_its_message_and_never_goes_stale():
    message = (
        "interrupted by SIGTERM at step 700, last checkpoint at step 700; "
        "resume with zoo train moons --run-name m --resume"
    )
    stopped = run_status(beat("interrupted", 1000, message=message), NOW, stall_after=900)
    assert stopped.state == "stopped" and stopped.detail == message
    assert stopped.elapsed == pytest.approx(4000)  # ended: elapsed up to its last heartbeat
