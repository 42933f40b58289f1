"""`zoo modal submit` up to the one network call: Modal's spawn and the Volume are stood in for.

The Volume is a local directory with its layout (LocalDirStore); `spawn` records what it was
given. Everything else — config resolution, the remote config, name collisions, the record the
container checks, rollback when the spawn fails — runs for real.
"""

import json
import math
import time

import pytest
from typer.testing import CliRunner

pytest.importorskip("modal", reason="submitting needs the 'remote' extra (pip install 'zoo[remote]')")

from test_remote_fixtures import write_run  # noqa: E402

from zoo.remote import credentials, modal_app  # noqa: E402
from zoo.remote import submission as submission_module  # noqa: E402
from zoo.remote.status import CallState  # noqa: E402
from zoo.remote.store import LocalDirStore  # noqa: E402
from zoo_cli.main import app as zoo_app  # noqa: E402

runner = CliRunner()


@pytest.fixture
def fake_modal(tmp_path, monkeypatch):
    volume = tmp_path / "volume"
    volume.mkdir()
    spawned: list[dict] = []

    def spawn(built, config, submission_id, resume, volume_name):
        record = json.loads((volume / "remote" / config["run_name"] / "submission.json").read_text())
        assert record["submission_id"] == submission_id, (
            "the record is on the Volume before the container starts"
        )
        spawned.append(
            {
                "gpu": built.options["gpu"],
                "timeout": built.options["timeout"],
                "config": config,
                "resume": resume,
            }
        )
        if config["run_name"].startswith("doomed"):
            raise ConnectionError("modal went away")
        return f"fc-{len(spawned)}", "ap-1"

    monkeypatch.setattr(credentials, "check_modal_ready", lambda: None)
    monkeypatch.setattr(modal_app, "ModalVolumeStore", lambda name: LocalDirStore(volume, label="remote"))
    monkeypatch.setattr(modal_app, "spawn", spawn)
    monkeypatch.setattr(modal_app, "cancel", cancelled.append)

    def wait_for_cancelled_container(seconds):
        # What the store holds while the cancelled container may still write: the old record.
        records = list((volume / "remote").glob("*/submission.json"))
        waited.append((list(cancelled), [json.loads(r.read_text())["call_id"] for r in records], seconds))

    monkeypatch.setattr(submission_module, "wait_for_cancelled_container", wait_for_cancelled_container)
    return volume, spawned


waited: list[tuple[list[str], list[str], float]] = []


cancelled: list[str] = []


@pytest.fixture(autouse=True)
def no_cancels_yet():
    cancelled.clear()
    waited.clear()


def submission(volume, run):
    return json.loads((volume / "remote" / run / "submission.json").read_text())


def backdate_submission(volume, run, seconds=7200.0):
    """Submitted `seconds` earlier: the heartbeats write_run writes then come from its container."""
    path = volume / "remote" / run / "submission.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "submitted": record["submitted"] - seconds}))


def test_submit_sends_the_resolved_remote_config_and_records_the_call(fake_modal):
    volume, spawned = fake_modal
    result = runner.invoke(
        zoo_app,
        [
            "modal",
            "submit",
            "moons",
            "train.steps=300",
            "--ratio",
            "0.5",
            "--gpu",
            "H100:2",
            "--run-name",
            "m1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "m1" in result.output and "fc-1" in result.output
    (call,) = spawned
    assert call["gpu"] == "H100:2" and call["timeout"] == 12 * 3600 and call["resume"] is False
    config = call["config"]
    assert config["loss"]["ratio"] == 0.5 and config["train"]["steps"] == 300 and config["preset"] == "moons"
    assert (config["output_dir"], config["device"], config["data"]["root"]) == (
        "/vol/outputs",
        "cuda",
        "/vol/data",
    )
    record = submission(volume, "m1")
    assert record["call_id"] == "fc-1" and record["nproc"] == 2 and record["retries"] == 5
    assert record["config"] == config and record["app_name"] == "zoo-m1"


def test_a_name_in_use_is_refused_unless_resuming(fake_modal):
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m2"]).exit_code == 0
    again = runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m2"])
    assert again.exit_code == 2 and "already exists" in " ".join(again.output.split())
    assert len(spawned) == 1
    backdate_submission(volume, "m2")

    # Resuming needs a checkpoint, and a run that is not running any more.
    refused = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m2"])
    assert refused.exit_code == 2 and "no checkpoint" in " ".join(refused.output.split())
    write_run(volume / "outputs", "m2", archived=[], last_step=100, status="running", updated_ago=10, age=10)
    live = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m2"])
    assert live.exit_code == 2 and "still running" in " ".join(live.output.split())
    write_run(volume / "outputs", "m2", archived=[], last_step=100, status="finished")
    resumed = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m2", "--steps", "500"])
    assert resumed.exit_code == 0, resumed.output
    assert spawned[-1]["resume"] is True and spawned[-1]["config"]["train"]["steps"] == 500
    assert spawned[-1]["config"]["output_dir"] == "/vol/outputs"  # the stored remote config, extended
    assert submission(volume, "m2")["call_id"] == "fc-2"
    assert cancelled == []  # the previous call had finished: nothing to cancel


def test_a_failed_spawn_leaves_the_name_free(fake_modal):
    volume, spawned = fake_modal
    result = runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "doomed-1"])
    assert result.exit_code != 0 and isinstance(result.exception, ConnectionError)
    assert not (volume / "remote" / "doomed-1" / "submission.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["moons", "--gpu", "V100"], "unknown GPU"),
        (["moons", "--timeout", "30h"], "24h"),
        (["moons", "--retries", "50"], "--retries"),
        (["moons", "loss.ratio=7"], "loss.ratio"),
        (["--run-name", "x"], "give a preset"),
        (["--resume"], "--resume needs --run-name"),
    ],
)
def test_bad_submissions_fail_before_anything_is_sent(fake_modal, args, message):
    volume, spawned = fake_modal
    result = runner.invoke(zoo_app, ["modal", "submit", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert spawned == [] and not (volume / "remote").exists()


def remote_states(volume) -> dict[str, str]:
    result = runner.invoke(zoo_app, ["modal", "status", "--volume-dir", str(volume), "--json"])
    assert result.exit_code == 0, result.output
    return {r["run"]: r["state"] for r in json.loads(result.output)}


def test_a_stopped_run_resumed_is_no_longer_stopped(fake_modal):
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m3"]).exit_code == 0
    write_run(volume / "outputs", "m3", archived=[], last_step=100, status="running", updated_ago=10, age=10)
    stopped = runner.invoke(zoo_app, ["modal", "stop", "m3"])
    assert stopped.exit_code == 0, stopped.output
    assert cancelled == ["fc-1"] and remote_states(volume) == {"m3": "stopped"}

    # The killed container never wrote "ended": its heartbeat still looks fresh, yet the run is stopped.
    resumed = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m3"])
    assert resumed.exit_code == 0, resumed.output
    assert spawned[-1]["resume"] is True and cancelled == ["fc-1"]  # a stopped call is not cancelled twice
    # Stopped just now, its container may still be saving: the rest of its grace is waited out,
    # while the store still names the stopped call.
    [(_, records, seconds)] = waited
    assert records == ["fc-1"] and 38 < seconds <= 40
    assert f"waiting {math.ceil(seconds)} s more for its container to stop writing" in resumed.output
    assert (volume / "remote" / "m3" / "stopped.json").exists()  # one writer: the stop's record stays
    # The resumed attempt is running: its heartbeat is fresh and the stop predates the resume.
    write_run(volume / "outputs", "m3", archived=[], last_step=120, status="running", updated_ago=5, age=5)
    assert remote_states(volume) == {"m3": "running"}
    # ...and stopping it again stops it again.
    assert runner.invoke(zoo_app, ["modal", "stop", "m3"]).exit_code == 0
    assert cancelled == ["fc-1", "fc-2"] and remote_states(volume) == {"m3": "stopped"}


@pytest.mark.parametrize("stopped_ago, wait", [(30, 10), (39.5, 0.5), (40.5, None), (3600, None)])
def test_a_resume_soon_after_a_stop_waits_out_the_rest_of_the_grace(fake_modal, stopped_ago, wait):
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m10"]).exit_code == 0
    backdate_submission(volume, "m10")
    write_run(volume / "outputs", "m10", archived=[], last_step=100, status="running", updated_ago=10)
    assert runner.invoke(zoo_app, ["modal", "stop", "m10"]).exit_code == 0
    stopped = volume / "remote" / "m10" / "stopped.json"
    stopped.write_text(json.dumps({"stopped": time.time() - stopped_ago}))
    resumed = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m10"])
    assert resumed.exit_code == 0, resumed.output
    assert cancelled == ["fc-1"] and len(spawned) == 2
    text = " ".join(resumed.output.split())
    if wait is None:
        assert waited == [] and "waiting" not in text
    else:
        [(_, records, seconds)] = waited
        assert records == ["fc-1"] and wait - 1 < seconds <= wait
        assert f"m10 was stopped {stopped_ago:.0f} s ago; waiting {math.ceil(seconds)} s more" in text


@pytest.mark.parametrize(
    "heartbeat, cancels",
    [
        ({"status": "running", "updated_ago": 3600}, True),  # stalled: its container may hang on
        ({"status": "failed", "updated_ago": 60, "error": "RuntimeError: NCCL"}, False),  # ended for good
        ({"status": "finished", "updated_ago": 60}, False),
    ],
)
def test_resuming_a_run_whose_call_may_still_run_cancels_that_call_first(fake_modal, heartbeat, cancels):
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m4"]).exit_code == 0
    backdate_submission(volume, "m4")
    write_run(volume / "outputs", "m4", archived=[], last_step=100, **heartbeat)
    resumed = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m4"])
    assert resumed.exit_code == 0, resumed.output
    assert cancelled == (["fc-1"] if cancels else []) and len(spawned) == 2
    # A cancelled call's container is given time to end before the new record and container:
    # the wait comes after the cancel, while the store still names the old call.
    assert waited == ([(["fc-1"], ["fc-1"], 40.0)] if cancels else [])
    assert ("waiting 40 s for its container to stop writing" in " ".join(resumed.output.split())) == cancels


def test_status_when_modal_cannot_be_asked_about_a_call(fake_modal, monkeypatch):
    volume, _ = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m5"]).exit_code == 0
    backdate_submission(volume, "m5")
    write_run(volume / "outputs", "m5", archived=[], last_step=100, status="running", updated_ago=3600)

    def unreachable(call_id):
        raise modal_app.modal.exception.ConnectionError("modal went away")

    monkeypatch.setattr(modal_app, "call_state", unreachable)
    result = runner.invoke(zoo_app, ["modal", "status", "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["state"] == "stalled"  # judged from its files, not "failed"
    assert "could not ask Modal about call fc-1" in " ".join(result.stderr.split())


def test_a_second_resume_while_the_first_is_pending_is_refused(fake_modal):
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m6"]).exit_code == 0
    backdate_submission(volume, "m6")
    write_run(
        volume / "outputs", "m6", archived=[], last_step=100, status="failed", updated_ago=600, error="x"
    )
    first = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m6"])
    assert first.exit_code == 0, first.output
    assert len(spawned) == 2
    # Its container has not started: the heartbeat is still the failed attempt's.
    assert remote_states(volume) == {"m6": "pending"}
    second = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m6"])
    text = " ".join(second.output.split())
    assert second.exit_code == 2 and "a resume of 'm6' is already pending (call fc-2" in text, text
    assert "`zoo modal stop m6` first" in text
    assert len(spawned) == 2 and cancelled == [] and submission(volume, "m6")["call_id"] == "fc-2"
    # After a stop, resuming is allowed again.
    assert runner.invoke(zoo_app, ["modal", "stop", "m6"]).exit_code == 0
    assert runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m6"]).exit_code == 0
    assert len(spawned) == 3


def test_within_clock_skew_the_containers_start_record_decides(fake_modal):
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m7"]).exit_code == 0
    # A heartbeat 5 s older than the submission may be skew: without a start line, still pending.
    write_run(volume / "outputs", "m7", archived=[], last_step=100, status="failed", updated_ago=5, error="x")
    assert runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m7"]).exit_code == 2
    start = {"event": "start", "submission_id": submission(volume, "m7")["submission_id"], "attempt": 1}
    (volume / "remote" / "m7" / "attempts.jsonl").write_text(json.dumps(start) + "\n")
    resumed = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m7"])
    assert resumed.exit_code == 0, resumed.output
    assert len(spawned) == 2


def test_a_batch_that_does_not_split_over_the_gpus_is_refused_before_submitting(fake_modal):
    volume, spawned = fake_modal
    result = runner.invoke(zoo_app, ["modal", "submit", "moons", "train.batch_size=256", "--gpu", "H100:3"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and spawned == [] and not (volume / "remote").exists()
    assert "train.batch_size=256 must be divisible by processes x grad_accum = 3 x 1 = 3" in text
    assert "use train.batch_size=255 or 258, or change the GPU count (--gpu H100:3)" in text


def stamp_heartbeat(volume, run, submission_id):
    path = volume / "outputs" / run / "heartbeat.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "submission_id": submission_id}))


def test_a_heartbeat_stamped_by_the_previous_submission_is_its_own_whatever_the_clocks_say(fake_modal):
    """The cancelled container's late write (after the resume was submitted) is still the old attempt's."""
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m8"]).exit_code == 0
    old_id = submission(volume, "m8")["submission_id"]
    backdate_submission(volume, "m8")
    write_run(
        volume / "outputs", "m8", archived=[], last_step=100, status="failed", updated_ago=600, error="x"
    )
    stamp_heartbeat(volume, "m8", old_id)
    assert runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m8"]).exit_code == 0
    # Written 40 s *after* the resume was submitted (past any clock-skew allowance), but stamped
    # with the old submission: the cancelled container's last words.
    write_run(
        volume / "outputs", "m8", archived=[], last_step=100, status="failed", updated_ago=-40, error="late"
    )
    stamp_heartbeat(volume, "m8", old_id)
    assert remote_states(volume) == {"m8": "pending"}
    second = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m8"])
    assert second.exit_code == 2 and "already pending" in " ".join(second.output.split())
    # Once the new container writes (its own stamp), the heartbeat is believed.
    write_run(volume / "outputs", "m8", archived=[], last_step=120, status="running", updated_ago=0)
    stamp_heartbeat(volume, "m8", submission(volume, "m8")["submission_id"])
    assert remote_states(volume) == {"m8": "running"}
    assert len(spawned) == 2


def test_a_resume_whose_container_died_before_reporting_can_be_resumed(fake_modal, monkeypatch):
    """Modal's verdict on the pending call decides when no heartbeat will ever come."""
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m9"]).exit_code == 0
    backdate_submission(volume, "m9")
    write_run(
        volume / "outputs", "m9", archived=[], last_step=100, status="failed", updated_ago=600, error="x"
    )
    assert runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m9"]).exit_code == 0
    verdicts = {"fc-2": CallState("running")}
    monkeypatch.setattr(modal_app, "call_state", lambda call_id: verdicts[call_id])
    assert runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m9"]).exit_code == 2
    verdicts["fc-2"] = CallState("failed", "ImportError: no module named torch")
    third = runner.invoke(zoo_app, ["modal", "submit", "--resume", "--run-name", "m9"])
    assert third.exit_code == 0, third.output
    assert len(spawned) == 3 and cancelled == []  # an ended call needs no cancelling


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe{}", b"[]", b'{"status": 3}'])
@pytest.mark.parametrize(
    "damaged", ["outputs/m11/heartbeat.json", "remote/m11/submission.json", "remote/m11/stopped.json"]
)
def test_a_damaged_remote_record_is_named_in_one_line(fake_modal, damaged, content):
    volume, spawned = fake_modal
    assert runner.invoke(zoo_app, ["modal", "submit", "moons", "--run-name", "m11"]).exit_code == 0
    backdate_submission(volume, "m11")
    write_run(volume / "outputs", "m11", archived=[], last_step=100, status="running", updated_ago=3600)
    (volume / damaged).write_bytes(content)
    commands = [["modal", "submit", "--resume", "--run-name", "m11"]]
    if damaged.endswith("submission.json"):
        commands.append(["modal", "stop", "m11"])
    for command in commands:
        result = runner.invoke(zoo_app, command)
        assert result.exit_code == 1 and not isinstance(result.exception, Exception), result.output
        [line] = result.output.strip().splitlines()
        assert line.startswith(f"error: {damaged} on ") and "is damaged" in line, line
    assert len(spawned) == 1 and cancelled == []
