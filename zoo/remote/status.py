"""What state a run is in, from its heartbeat.json (and, for remote runs, what Modal says).

The trainer rewrites heartbeat.json at every log step.  A run whose heartbeat says "running"
but has not been updated for `stall_after` seconds is *stalled*: its process was killed
without a chance to report (the OOM killer sends SIGKILL, so no `finally` runs) or it hangs:
such a run must not appear to be running for hours.
"""

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

# "dead": a local run whose heartbeat says running while its process is certainly gone (killed
# without a chance to report; zoo.runs.writer_gone).
State = Literal["pending", "running", "finished", "failed", "stalled", "stopped", "dead", "unknown"]

DEFAULT_STALL_AFTER = 15 * 60.0
# Submission times come from the client's clock, heartbeats from the container's: a heartbeat
# older than a submission by more than this was written before that submission (by an earlier
# attempt), not by its container.
CLOCK_SKEW_S = 30.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '1h30m', '2d' or plain seconds -> seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    pos = 0
    total = 0.0
    while pos < len(cleaned):
        match = _DURATION.match(cleaned, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"duration {text!r} is not understood; use e.g. 90s, 15m, 12h, 1h30m")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not cleaned or total <= 0:
        raise ValueError(f"duration {text!r} must be positive, e.g. 15m")
    return total


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f}m"
    hours, minutes = divmod(int(minutes), 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours / 24:.1f}d"


class RemoteTrainingError(RuntimeError):
    """A remote attempt's failure, the one exception its Modal function lets out (Modal then retries).

    Raised in the container (zoo.remote.worker, zoo.remote.modal_app) and recognised by the
    client's call lookup; defined here so that neither side needs the training stack to name it.
    """


@dataclass(frozen=True)
class CallState:
    """What Modal reports about the function call of a remote run."""

    state: Literal["running", "finished", "failed"]
    error: str | None = None


@dataclass(frozen=True)
class RunStatus:
    state: State
    detail: str
    step: int | None
    loss: float | None
    last_checkpoint: str | None
    elapsed: float | None
    updated_ago: float | None
    # What a running (or stalled) run was doing at its last heartbeat: "train", or "eval" (rank 0
    # evaluating, which keeps the heartbeat fresh too); None for ended runs and old heartbeats.
    phase: str | None = None


def run_status(
    heartbeat: dict[str, Any] | None,
    now: float,
    stall_after: float = DEFAULT_STALL_AFTER,
    submitted_at: float | None = None,
    stopped_at: float | None = None,
    call: CallState | None = None,
    submission_id: str | None = None,
) -> RunStatus:
    """The state of one run. `submitted_at`/`stopped_at`/`call`/`submission_id` exist only for remote runs."""
    if heartbeat is None:
        stop = stop_in_effect(stopped_at, submitted_at)
        return _status_without_heartbeat(now, stall_after, submitted_at, stop, call)
    if submitted_at is not None and heartbeat_predates(heartbeat, submitted_at, submission_id):
        # A resume whose container has not written yet: the heartbeat is the previous attempt's.
        stop = stop_in_effect(stopped_at, submitted_at)
        waiting = _status_without_heartbeat(now, stall_after, submitted_at, stop, call)
        return replace(
            waiting,
            step=heartbeat.get("step"),
            loss=heartbeat.get("loss"),
            last_checkpoint=heartbeat.get("last_checkpoint"),
            updated_ago=now - float(heartbeat["updated"]),
        )
    updated = float(heartbeat["updated"])
    started = float(heartbeat.get("started", updated))
    stop = stop_in_effect(stopped_at, submitted_at if submitted_at is not None else started)
    reported = heartbeat["status"]
    ended = reported in ("finished", "failed", "interrupted")
    elapsed = (updated if ended else now) - started
    age = now - updated

    phase = heartbeat.get("phase")

    def status(state: State, detail: str) -> RunStatus:
        return RunStatus(
            state=state,
            detail=detail,
            step=heartbeat.get("step"),
            loss=heartbeat.get("loss"),
            last_checkpoint=heartbeat.get("last_checkpoint"),
            elapsed=elapsed,
            updated_ago=age,
            phase=phase if state in ("running", "stalled") else None,
        )

    if reported == "finished":
        return status("finished", "")
    if stop is not None and (reported != "failed" or updated >= stop):
        # A failure written after the stop is its consequence (the cancelled container's
        # supervisor records the interruption), not a cause to report.
        return status("stopped", f"stopped with `zoo modal stop` {format_duration(now - stop)} ago")
    if reported == "interrupted":  # SIGINT/SIGTERM: saved its step and stopped (zoo.interrupts)
        return status("stopped", heartbeat.get("message") or "interrupted")
    if reported == "failed":
        error = heartbeat.get("error") or "failed without an error message"
        if stop is not None and heartbeat.get("retrying"):  # the stop ended the retries
            ago = format_duration(now - stop)
            return status("stopped", f"stopped with `zoo modal stop` {ago} ago (last error: {error})")
        if heartbeat.get("retrying"):
            error += (
                f" (attempt {heartbeat.get('attempt', '?')}; "
                "Modal retries it, resuming from the last checkpoint)"
            )
        return status("failed", error)
    if age > stall_after:
        if call is not None and call.state == "failed":
            return status("failed", call.error or "the Modal function call failed")
        during = f" in phase {phase!r}" if phase else ""
        return status(
            "stalled",
            f"no heartbeat for {format_duration(age)} (limit {format_duration(stall_after)}){during}; "
            "the process was probably killed without a chance to report "
            "(e.g. host out of memory: SIGKILL) or hangs",
        )
    return status("running", "")


def stop_in_effect(stopped_at: float | None, submitted_at: float | None) -> float | None:
    """The time of a `zoo modal stop` that still applies, or None when a later submission superseded it.

    `zoo modal submit --resume` after a stop starts the run again, and the old stopped.json
    stays (every Volume file has one writer: only `zoo modal stop` writes it).  The stop is
    compared with the submission time rather than with the heartbeat: both times come from
    the client's clock (not the container's), the submission record is on the Volume before the
    new container starts (so a resumed run is "pending", not "stopped", while it waits), and a
    heartbeat's `started` is the first attempt's, which a resume keeps.
    """
    if stopped_at is None or (submitted_at is not None and stopped_at < submitted_at):
        return None
    return stopped_at


def _status_without_heartbeat(
    now: float,
    stall_after: float,
    submitted_at: float | None,
    stopped_at: float | None,
    call: CallState | None,
) -> RunStatus:
    """`stopped_at`: a stop in effect (see stop_in_effect)."""

    def status(state: State, detail: str) -> RunStatus:
        elapsed = None if submitted_at is None else now - submitted_at
        return RunStatus(state, detail, None, None, None, elapsed, None)

    if stopped_at is not None:
        return status("stopped", "stopped before training started")
    if call is not None and call.state == "failed":
        return status("failed", call.error or "the Modal function call failed before training started")
    if call is not None and call.state == "finished":
        return status("failed", "the Modal function ended without starting training (no heartbeat)")
    if submitted_at is None:
        return status("unknown", "no heartbeat.json (not written by zoo train, or written before it existed)")
    waited = now - submitted_at
    if waited > stall_after:
        return status(
            "stalled",
            f"submitted {format_duration(waited)} ago and no heartbeat yet: the container never started "
            "training (image build, GPU capacity, or a crash before the first step)",
        )
    return status("pending", f"submitted {format_duration(waited)} ago; waiting for the container")


def is_live_writer(heartbeat: dict[str, Any] | None, now: float, live_window: float) -> bool:
    """Whether a process may still be writing this run (recent heartbeat, not ended)."""
    if heartbeat is None or heartbeat.get("status") != "running":
        return False
    updated = heartbeat.get("updated")
    if not isinstance(updated, (int, float)):
        return True  # a running heartbeat without its time: assume the worst, a live writer
    return now - updated < live_window


def heartbeat_predates(
    heartbeat: dict[str, Any] | None, submitted_at: float, submission_id: str | None = None
) -> bool:
    """Whether `heartbeat` is an earlier attempt's, not that of the submission made at `submitted_at`.

    Remote attempts stamp their heartbeats with their submission id, which decides without any
    clock (also for a cancelled container's late write).  Heartbeats without one (older runs)
    are judged by time, allowing CLOCK_SKEW_S between the client's and the container's clocks.
    """
    if heartbeat is None:
        return True
    if submission_id is not None and "submission_id" in heartbeat:
        return heartbeat["submission_id"] != submission_id
    return float(heartbeat["updated"]) < submitted_at - CLOCK_SKEW_S
