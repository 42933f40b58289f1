"""The Modal layer — the only module that imports `modal` — kept thin on purpose.

It defines what Modal needs and nothing else: the image (the project's dependencies pinned to
the versions installed here, plus the local `zoo` source), one Volume mounted at /vol for
data, run folders and trackio data, and the function that runs one training attempt
(`remote_train`, which hands over to zoo.remote.worker.supervise at once).  It also wraps
the Volume as a RunStore and the few Modal calls the CLI makes (spawn, poll, logs, cancel).
Everything beneath is tested without Modal; this module is tested by building its objects
offline and reading back GPU, timeout, retries, mounts and packages.

One ephemeral app per run (`zoo-<run>`), started detached: it outlives the client, shows up
by name in Modal's dashboard, and lets each run choose its own GPU, timeout and retries.
"""

import importlib.metadata
import io
import re
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modal
import modal.exception
from modal.volume import FileEntryType

from zoo.config.loading import config_to_dict
from zoo.config.schema import ZooConfigBody
from zoo.remote.layout import DEFAULT_VOLUME, VOLUME_MOUNT
from zoo.remote.status import CallState, RemoteTrainingError
from zoo.remote.store import RunStore, StoreEntry, StoreError, write_chunks_atomically
from zoo.remote.submission import GpuRequest, Launcher, parse_gpu

REPO_ROOT = Path(__file__).resolve().parents[2]
# Remote runs may evaluate FID and encode latents: the optional extras that need no local GPU.
REMOTE_EXTRAS = ("fid", "vae")
# Retries: Modal allows at most 60 s between attempts; start quickly (preemption is the common cause).
RETRY_INITIAL_DELAY_S = 10.0
RETRY_MAX_DELAY_S = 60.0
# Model weights and FID statistics downloaded by a run stay on the Volume for the next one.
REMOTE_ENV = {"HF_HOME": str(VOLUME_MOUNT / "data" / "huggingface"), "PYTHONUNBUFFERED": "1"}
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class ModalSpec:
    """What one submission asks Modal for."""

    app_name: str
    gpu: GpuRequest
    timeout_s: int
    retries: int
    volume_name: str = DEFAULT_VOLUME


def declared_requirements() -> list[str]:
    """The project's runtime dependencies plus REMOTE_EXTRAS, from pyproject.toml or the
    installed metadata."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        optional = project.get("optional-dependencies", {})
        return [*project["dependencies"], *(r for extra in REMOTE_EXTRAS for r in optional.get(extra, []))]
    requirements = []
    for requirement in importlib.metadata.requires("zoo") or []:
        spec, _, marker = requirement.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra is None or extra.group(1) in REMOTE_EXTRAS:
            requirements.append(spec.strip())
    return requirements


def pinned_packages() -> list[str]:
    """Each requirement pinned to the version installed here (`torch==2.14.1`), so remote = local.

    Local version labels (`+cu130`) are dropped: PyPI serves the plain version, and on Linux
    that is the CUDA build.  A requirement not installed here keeps its declared range.
    """
    pinned = []
    for requirement in declared_requirements():
        name = _REQUIREMENT_NAME.match(requirement).group(1)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pinned.append(requirement)
            continue
        pinned.append(f"{name}=={version.split('+')[0]}")
    return pinned


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def build_image(packages: list[str]) -> modal.Image:
    return (
        modal.Image.debian_slim(python_version=python_version())
        .uv_pip_install(*packages)
        .env(REMOTE_ENV)
        .add_local_python_source("zoo")  # last: local files change often, the layers above rarely
    )


def volume(name: str) -> modal.Volume:
    return modal.Volume.from_name(name, create_if_missing=True)


def function_options(spec: ModalSpec, image: modal.Image) -> dict[str, Any]:
    """The keyword arguments of `app.function` for one submission."""
    return {
        "image": image,
        "gpu": spec.gpu.modal_spec,
        "timeout": spec.timeout_s,
        "retries": modal.Retries(
            max_retries=spec.retries,
            initial_delay=RETRY_INITIAL_DELAY_S,
            backoff_coefficient=2.0,
            max_delay=RETRY_MAX_DELAY_S,
        ),
        "volumes": {str(VOLUME_MOUNT): volume(spec.volume_name)},
    }


def remote_train(
    config: dict[str, Any], submission_id: str, resume: bool, nproc: int, volume_name: str
) -> dict:
    """One attempt of a remote run, inside the container (Modal retries call it again).

    The only exception it lets out is RemoteTrainingError (Modal retries after any exception,
    so this changes no retry): `call_state` on the client can then tell the run's failure from
    a failure to ask Modal about it.  Everything is inside the `try`, the imports too: an image
    that cannot import the trainer fails like any other attempt.
    """
    try:
        from zoo.remote.worker import supervise

        mounted = modal.Volume.from_name(volume_name)
        work_dir = Path(tempfile.mkdtemp(prefix="zoo-attempt-"))
        return supervise(
            volume_root=Path(str(VOLUME_MOUNT)),
            config=config,
            submission_id=submission_id,
            resume=resume,
            nproc=nproc,
            commit=mounted.commit,
            work_dir=work_dir,
            command=f"zoo modal submit (run {config['run_name']})",
        )
    except RemoteTrainingError:
        raise
    except Exception as exc:  # noqa: BLE001 - the attempt's own machinery failed (import, Volume, disk): one type out
        raise RemoteTrainingError(
            f"the attempt failed outside training: {type(exc).__name__}: {exc}"
        ) from exc


def remote_encode(request: dict, volume_name: str) -> dict:
    """`zoo data encode-latents --modal` inside the container (zoo.remote.encode_job)."""
    from zoo.remote.encode_job import run_encode_request

    mounted = modal.Volume.from_name(volume_name)
    return run_encode_request(request, Path(str(VOLUME_MOUNT)), commit=mounted.commit)


@dataclass
class BuiltApp:
    app: modal.App
    function: modal.Function
    image: modal.Image
    options: dict[str, Any]


def build_app(spec: ModalSpec) -> BuiltApp:
    """The app and function of one submission; builds Modal objects only, no network."""
    image = build_image(pinned_packages())
    options = function_options(spec, image)
    # include_source=False: the code reaches the container once, through the image's zoo source.
    app = modal.App(spec.app_name, include_source=False)
    function = app.function(**options)(remote_train)
    return BuiltApp(app, function, image, options)


# CPU cores of an encode container: its DataLoader workers decode and resize the JPEGs.
ENCODE_CPUS = 8.0


def build_encode_app(spec: ModalSpec) -> BuiltApp:
    """The app and function of one encode job; builds Modal objects only, no network."""
    image = build_image(pinned_packages())
    options = function_options(spec, image) | {"cpu": ENCODE_CPUS}
    app = modal.App(spec.app_name, include_source=False)
    function = app.function(**options)(remote_encode)
    return BuiltApp(app, function, image, options)


def spawn_encode(built: BuiltApp, request: dict, volume_name: str) -> tuple[str, str]:
    """Start an encode job detached; returns (call id, app id). Needs a token and the network."""
    with modal.enable_output(), built.app.run(detach=True):
        call = built.function.spawn(request, volume_name)
        app_id = built.app.app_id
    return call.object_id, app_id


def spawn(
    built: BuiltApp, config: dict[str, Any], submission_id: str, resume: bool, volume_name: str
) -> tuple[str, str]:
    """Start the run detached; returns (call id, app id). Needs a token and the network."""
    nproc = int(built.options["gpu"].partition(":")[2] or 1)
    with modal.enable_output(), built.app.run(detach=True):
        call = built.function.spawn(config, submission_id, resume, nproc, volume_name)
        app_id = built.app.app_id
    return call.object_id, app_id


# What FunctionCall.get raises when the call itself ended badly: remote_train's one exception,
# and Modal's verdicts on the container (time limit, internal failure, a terminated or crashed
# container, a remote exception it cannot rebuild here).  Anything else (no network, a bad
# token, an unknown call id) is a failure to ask, and propagates: it is not the run's state.
CALL_FAILURES: tuple[type[BaseException], ...] = (
    modal.exception.FunctionTimeoutError,
    modal.exception.InternalFailure,
    modal.exception.RemoteError,
    modal.exception.ExecutionError,
)
# What the Modal client raises when it cannot ask at all (no network, a bad token, an unknown id).
CLIENT_ERRORS: tuple[type[BaseException], ...] = (modal.exception.Error, OSError)


def call_state(call_id: str) -> CallState:
    """Modal's view of a run's function call, polled without waiting."""
    call = modal.FunctionCall.from_id(call_id)
    try:
        result = call.get(timeout=0)
    except TimeoutError:  # the builtin one: no output yet (Modal's own timeouts are not subclasses)
        return CallState("running")
    except modal.exception.OutputExpiredError:
        return CallState("finished")  # results are kept 24 h; the heartbeat tells the rest
    except (RemoteTrainingError, *CALL_FAILURES) as exc:
        return CallState("failed", f"{type(exc).__name__}: {exc}")
    except CLIENT_ERRORS:
        raise  # a failure to ask, not the run's state
    except Exception as exc:  # noqa: BLE001 - any other exception the call raised (rebuilt here): its failure
        return CallState("failed", f"{type(exc).__name__}: {exc}")
    if result["status"] == "finished":
        return CallState("finished")
    return CallState("failed", result.get("error"))


def log_lines(call_id: str, tail: int, follow: bool) -> Iterator[str]:
    call = modal.FunctionCall.from_id(call_id)
    entries = call.logs.stream() if follow else call.logs.tail(entries=tail)
    for entry in entries:
        yield entry.message


def cancel(call_id: str) -> None:
    modal.FunctionCall.from_id(call_id).cancel(terminate_containers=True)


class ModalLauncher(Launcher):
    """Submissions' containers as Modal function calls, one ephemeral app per run."""

    def __init__(self, volume_name: str) -> None:
        self.volume_name = volume_name

    def spawn(self, cfg: ZooConfigBody, record: dict[str, Any]) -> tuple[str, str]:
        spec = ModalSpec(
            record["app_name"],
            parse_gpu(record["gpu"]),
            record["timeout_s"],
            record["retries"],
            self.volume_name,
        )
        return spawn(
            build_app(spec), config_to_dict(cfg), record["submission_id"], record["resume"], self.volume_name
        )

    def cancel(self, call_id: str) -> None:
        cancel(call_id)


class ModalVolumeStore(RunStore):
    """A Modal Volume seen from outside through listdir/read_file/batch_upload/remove_file."""

    def __init__(self, name: str = DEFAULT_VOLUME, label: str = "remote") -> None:
        self.name = name
        self.label = label
        self._volume = modal.Volume.from_name(name, create_if_missing=True)

    def describe(self) -> str:
        return f"modal volume {self.name!r}"

    @staticmethod
    def _entry(entry: Any) -> StoreEntry:
        return StoreEntry(
            path=entry.path.lstrip("/"),
            size=entry.size,
            mtime=float(entry.mtime),
            is_dir=entry.type == FileEntryType.DIRECTORY,
        )

    def list(self, prefix: str, recursive: bool = False) -> list[StoreEntry]:
        try:
            entries = self._volume.listdir(prefix or "/", recursive=recursive)
        except modal.exception.NotFoundError:
            return []
        return sorted((self._entry(e) for e in entries), key=lambda e: e.path)

    def stat(self, path: str) -> StoreEntry | None:
        try:
            entries = self._volume.listdir(path)
        except modal.exception.NotFoundError:
            return None
        matching = [
            self._entry(e) for e in entries if e.path.lstrip("/") == path and e.type == FileEntryType.FILE
        ]
        return matching[0] if matching else None

    def read_bytes(self, path: str) -> bytes:
        try:
            return b"".join(self._volume.read_file(path))
        except modal.exception.NotFoundError as exc:
            raise StoreError(f"no file {path} in {self.describe()}") from exc

    def download(self, path: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> int:
        try:
            return write_chunks_atomically(self._volume.read_file(path), dest, on_bytes)
        except modal.exception.NotFoundError as exc:
            raise StoreError(f"no file {path} in {self.describe()}") from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        with self._volume.batch_upload(force=True) as batch:
            batch.put_file(io.BytesIO(data), f"/{path}")

    def remove(self, path: str, recursive: bool = False) -> None:
        self._volume.remove_file(path, recursive=recursive)
