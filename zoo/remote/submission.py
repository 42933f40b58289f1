"""The client side of `zoo modal submit`, without Modal: GPU strings, the remote config, the
record, and the submission itself against a `Launcher` (Modal's is zoo.remote.modal_app's).

The config is resolved on the laptop (preset + ZOO_ environment + overrides) and sent whole,
so the remote run trains exactly what `zoo train` would train here, with three changes that
make it a remote run: its folder is on the Volume, its datasets are read from the Volume
(every dataset's root, not the first one's alone), and it insists on CUDA (`auto` would
quietly train on the CPU of a container whose GPU is missing).

A submission writes its record to the Volume before the container starts (the container checks
that this submission owns the run name); if starting it fails, the Volume goes back to how it was.
"""

import json
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zoo.config.loading import check_batch_split, config_from_dict, config_to_dict, deep_merge
from zoo.config.schema import ZooConfigBody
from zoo.remote.layout import OUTPUTS, REGISTRY, check_run_name, mounted_path
from zoo.remote.status import (
    CLOCK_SKEW_S,
    DEFAULT_STALL_AFTER,
    CallState,
    format_duration,
    heartbeat_predates,
    is_live_writer,
    stop_in_effect,
)
from zoo.remote.store import RunStore
from zoo.runs import HEARTBEAT_STATUSES, json_object

# Modal's GPU types (modal.com/docs/guide/gpu); a count after ':' puts several in one container.
GPU_TYPES = ("T4", "L4", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H200", "B200")
MAX_GPUS_PER_CONTAINER = 8
MAX_TIMEOUT_S = 24 * 3600  # Modal's limit per attempt
_GPU = re.compile(r"^([A-Za-z0-9-]+?)(?::(\d+))?$")


class SubmitError(RuntimeError):
    """A submission that must not go ahead (name collision, nothing to resume, bad option)."""


class DamagedRecordError(RuntimeError):
    """A file zoo wrote for a remote run that does not read as what it should (damaged, cut off):
    the run, not the command, is in trouble."""


@dataclass(frozen=True)
class GpuRequest:
    kind: str
    count: int

    @property
    def modal_spec(self) -> str:
        return self.kind if self.count == 1 else f"{self.kind}:{self.count}"


def parse_gpu(text: str) -> GpuRequest:
    match = _GPU.match(text.strip())
    kind = match.group(1).upper() if match else ""
    canonical = {g.upper(): g for g in GPU_TYPES}
    if not match or kind not in canonical:
        raise ValueError(
            f"unknown GPU {text!r}; use one of {', '.join(GPU_TYPES)}, optionally with a count (H100:8)"
        )
    count = int(match.group(2) or 1)
    if not 1 <= count <= MAX_GPUS_PER_CONTAINER:
        raise ValueError(f"GPU count in {text!r} must be 1..{MAX_GPUS_PER_CONTAINER}")
    return GpuRequest(canonical[kind], count)


def check_timeout(seconds: float) -> int:
    if not 60 <= seconds <= MAX_TIMEOUT_S:
        raise ValueError(
            f"--timeout must lie between 1m and 24h (Modal's limit per attempt), got {seconds:.0f}s"
        )
    return int(seconds)


def check_retries(retries: int) -> int:
    if not 0 <= retries <= 10:
        raise ValueError(f"--retries must lie between 0 and 10, got {retries}")
    return retries


def remote_config(cfg: ZooConfigBody, run_name: str) -> ZooConfigBody:
    """`cfg` as the container runs it (see the module doc)."""
    check_run_name(run_name)
    data = config_to_dict(cfg)
    data["run_name"] = run_name
    data["output_dir"] = str(mounted_path(OUTPUTS))
    data["device"] = "cuda"
    data["experiment_log"] = str(mounted_path(OUTPUTS, run_name, "experiment_log.md"))
    if not str(data["data"]["root"]).startswith(str(mounted_path())):
        data["data"]["root"] = str(mounted_path("data"))
    return config_from_dict(data)


def app_name_for(run: str) -> str:
    """The Modal app of a run: letters, digits, '-', '_', '.'; at most 64 characters."""
    return "zoo-" + re.sub(r"[^A-Za-z0-9._-]", "-", run)[:60]


def check_gpu_split(cfg: ZooConfigBody, gpu: GpuRequest) -> None:
    """Several GPUs share the batch: it must split evenly over them."""
    check_batch_split(cfg, gpu.count, how=f"the GPU count (--gpu {gpu.modal_spec})")


def submission_record(
    cfg: ZooConfigBody,
    gpu: GpuRequest,
    timeout_s: int,
    retries: int,
    resume: bool,
    app_name: str,
    command: str,
) -> dict[str, Any]:
    return {
        "submission_id": uuid.uuid4().hex,
        "run_name": cfg.run_name,
        "submitted": time.time(),
        "gpu": gpu.modal_spec,
        "nproc": gpu.count,
        "timeout_s": timeout_s,
        "retries": retries,
        "resume": resume,
        "app_name": app_name,
        "command": command,
        "call_id": None,
        "config": config_to_dict(cfg),
    }


def submission_path(run: str) -> str:
    return f"{REGISTRY}/{run}/submission.json"


def stopped_path(run: str) -> str:
    return f"{REGISTRY}/{run}/stopped.json"


NUMBER = (int, float)
# What each record must hold for the checks here to read it.
SUBMISSION_FIELDS: dict[str, tuple[type, ...]] = {
    "submission_id": (str,),
    "submitted": NUMBER,
    "resume": (bool,),
    "config": (dict,),
}
HEARTBEAT_FIELDS: dict[str, tuple[type, ...]] = {"status": (str,), "updated": NUMBER}
STOPPED_FIELDS: dict[str, tuple[type, ...]] = {"stopped": NUMBER}


def read_json(store: RunStore, path: str, fields: dict[str, tuple[type, ...]]) -> dict[str, Any] | None:
    """The record at `path`, None if there is none; DamagedRecordError if it is not one zoo wrote
    (not UTF-8, not JSON, not an object, or without one of `fields` of its type)."""
    if store.stat(path) is None:
        return None
    record = json_object(store.read_bytes(path))
    if record is None or not all(has_type(record.get(key), types) for key, types in fields.items()):
        raise damaged(store, path)
    return record


def damaged(store: RunStore, path: str) -> DamagedRecordError:
    return DamagedRecordError(
        f"{path} on {store.describe()} is damaged: it is not the JSON record zoo writes there"
    )


def has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def read_submission(store: RunStore, run: str) -> dict[str, Any] | None:
    return read_json(store, submission_path(run), SUBMISSION_FIELDS)


def check_name_free(store: RunStore, run: str) -> None:
    """Refuse a name that a remote run already has (`--resume` continues one: check_resumable)."""
    if read_submission(store, run) is not None or store.list(f"{OUTPUTS}/{run}"):
        raise SubmitError(
            f"a remote run named {run!r} already exists on {store.describe()}; pass --resume to continue it, "
            "or choose another --run-name"
        )


@dataclass(frozen=True)
class ResumeTarget:
    """A remote run that `zoo modal submit --resume` may continue."""

    previous: dict[str, Any]  # its latest submission record: the config to continue
    # Its latest call, when that may still hold a container (a stalled run's hung process, or a
    # failed attempt Modal is about to retry): cancel it before the new call starts, so two
    # attempts never train into one run folder.
    cancel_call: str | None
    # When `zoo modal stop` cancelled its latest call, if that stop still applies: the stopped
    # container may still be saving and committing for a while (CANCELLED_CONTAINER_GRACE_S).
    stopped_at: float | None = None


def check_resumable(
    store: RunStore,
    run: str,
    live_window: float = DEFAULT_STALL_AFTER,
    call_lookup: Callable[[str], CallState | None] | None = None,
) -> ResumeTarget:
    """Refuse to resume a run without a checkpoint or one that is still running."""
    if store.stat(f"{OUTPUTS}/{run}/last.pt") is None:
        raise SubmitError(
            f"cannot resume remote run {run!r}: no checkpoint at {OUTPUTS}/{run}/last.pt "
            f"on {store.describe()}; `zoo ckpts --remote` lists remote runs"
        )
    previous = read_submission(store, run)
    if previous is None:
        raise SubmitError(
            f"remote run {run!r} has no submission record ({submission_path(run)}) to take its config from; "
            "it was not started with `zoo modal submit`"
        )
    heartbeat_path = f"{OUTPUTS}/{run}/heartbeat.json"
    heartbeat = read_json(store, heartbeat_path, HEARTBEAT_FIELDS)
    if heartbeat is not None and heartbeat["status"] not in HEARTBEAT_STATUSES:
        raise damaged(store, heartbeat_path)
    stopped = read_json(store, stopped_path(run), STOPPED_FIELDS)
    stopped_at = stop_in_effect(stopped["stopped"] if stopped else None, previous["submitted"])
    is_stopped = stopped_at is not None
    now = time.time()
    # A stopped run's heartbeat can look fresh for a while (a killed container never says it ended).
    if not is_stopped and is_live_writer(heartbeat, now, live_window):
        raise SubmitError(
            f"remote run {run!r} is still running (heartbeat {format_duration(now - heartbeat['updated'])} "
            f"ago); stop it first (`zoo modal stop {run}`) or wait for it to end"
        )
    if not is_stopped and awaits_container(store, run, previous, heartbeat):
        # A container that died before its first heartbeat (image build, import error, no GPU)
        # never reports: ask Modal whether the call has ended before calling it pending.
        call_id = previous.get("call_id")
        call = call_lookup(call_id) if call_lookup is not None and call_id else None
        if call is not None and call.state in ("failed", "finished"):
            return ResumeTarget(previous, None)
        what = "a resume" if previous["resume"] else "the submission"
        raise SubmitError(
            f"{what} of {run!r} is already pending (call {previous.get('call_id')}, submitted "
            f"{format_duration(now - previous['submitted'])} ago; its container has not reported yet); "
            f"`zoo modal stop {run}` first"
        )
    status = None if heartbeat is None else heartbeat["status"]
    ended = is_stopped or status == "finished" or (status == "failed" and not heartbeat.get("retrying"))
    return ResumeTarget(previous, None if ended else previous.get("call_id"), stopped_at)


def awaits_container(
    store: RunStore, run: str, submission: dict[str, Any], heartbeat: dict[str, Any] | None
) -> bool:
    """Whether the container of `submission` has yet to write the heartbeat (it is an earlier attempt's).

    A heartbeat stamped with a submission id answers directly.  Unstamped (older runs): clearly
    older than the submission, yes; within the clocks' disagreement (CLOCK_SKEW_S), the
    container's own record decides: it appends a "start" line to attempts.jsonl before training.
    """
    if heartbeat_predates(heartbeat, submission["submitted"], submission["submission_id"]):
        return True
    if "submission_id" in heartbeat or float(heartbeat["updated"]) >= submission["submitted"] + CLOCK_SKEW_S:
        return False
    attempts = f"{REGISTRY}/{run}/attempts.jsonl"
    lines = store.read_text(attempts).splitlines() if store.stat(attempts) is not None else []
    records = [json_object(line) for line in lines if line.strip()]
    return not any(
        r is not None and r.get("event") == "start" and r.get("submission_id") == submission["submission_id"]
        for r in records  # None: a line cut off by a killed container
    )


class Launcher(ABC):
    """Starts and cancels the containers of remote runs."""

    @abstractmethod
    def spawn(self, cfg: ZooConfigBody, record: dict[str, Any]) -> tuple[str, str]:
        """Start the run of `record` detached; (call id, app id)."""

    @abstractmethod
    def cancel(self, call_id: str) -> None:
        """Cancel a call and stop its container."""


@dataclass(frozen=True)
class Submission:
    """A submission checked against the store, ready to launch."""

    cfg: ZooConfigBody  # what the container trains
    record: dict[str, Any]  # what the store will hold (submission_path)
    previous: dict[str, Any] | None  # the record a resume replaces
    cancel_call: str | None  # the previous call, cancelled before the new one starts (ResumeTarget)
    # Seconds to wait before the new container starts, for the previous one to stop writing: the
    # whole grace after cancelling its call, what is left of it after a recent `zoo modal stop`.
    wait_s: float = 0.0
    stopped_ago: float | None = None  # seconds since that stop


def prepare_submission(
    store: RunStore,
    run: str,
    cfg: ZooConfigBody | None,
    given: dict[str, Any],
    gpu: GpuRequest,
    timeout_s: int,
    retries: int,
    command: str,
    call_lookup: Callable[[str], CallState | None] | None = None,
) -> Submission:
    """A new run `cfg` (its name must be free), or with cfg None the resume of `run` (it must be
    resumable), its stored config extended by the overrides `given`."""
    previous, cancel_call, wait_s, stopped_ago = None, None, 0.0, None
    if cfg is None:
        target = check_resumable(store, run, call_lookup=call_lookup)
        previous, cancel_call = target.previous, target.cancel_call
        if cancel_call is not None:
            wait_s = CANCELLED_CONTAINER_GRACE_S
        elif target.stopped_at is not None:
            stopped_ago = max(0.0, time.time() - target.stopped_at)  # a stop clock ahead: just now
            wait_s = max(0.0, CANCELLED_CONTAINER_GRACE_S - stopped_ago)
        cfg = config_from_dict(deep_merge(previous["config"], given))
        check_gpu_split(cfg, gpu)
    else:
        check_name_free(store, run)
    record = submission_record(cfg, gpu, timeout_s, retries, previous is not None, app_name_for(run), command)
    return Submission(cfg, record, previous, cancel_call, wait_s, stopped_ago)


# Modal gives a cancelled container about 30 s to stop (SIGINT, then SIGKILL), in which its
# supervisor stops training, saves and commits; zoo.remote.worker.CHILD_STOP_GRACE_S fits in it.
CANCELLED_CONTAINER_GRACE_S = 40.0


def wait_for_cancelled_container(seconds: float) -> None:
    """Let a cancelled container end before the call that replaces it starts: the Volume has no
    locks, and a commit the old container made after the new one mounted the Volume would mix two
    writers' files in the run folder (last write wins, file by file)."""
    time.sleep(seconds)


def launch_submission(store: RunStore, submission: Submission, launcher: Launcher) -> dict[str, Any]:
    """Cancel the call a resume replaces and wait for its container to end (or for a recently
    stopped one), put the record on the store, start the container, and record its call; the record
    as stored.  If the start fails, the store's record goes back to what it was (none for a new run)
    and the error propagates."""
    run = submission.record["run_name"]
    if submission.cancel_call is not None:
        launcher.cancel(submission.cancel_call)
    if submission.wait_s > 0:
        wait_for_cancelled_container(submission.wait_s)
    store.write_bytes(submission_path(run), json.dumps(submission.record, indent=2).encode())
    try:
        call_id, app_id = launcher.spawn(submission.cfg, submission.record)
    except BaseException:
        if submission.previous is None:
            store.remove(submission_path(run))
        else:
            store.write_bytes(submission_path(run), json.dumps(submission.previous, indent=2).encode())
        raise
    record = {**submission.record, "call_id": call_id, "app_id": app_id}
    store.write_bytes(submission_path(run), json.dumps(record, indent=2).encode())
    return record
