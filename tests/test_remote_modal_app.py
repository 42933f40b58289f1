"""The Modal layer built offline: GPU string, timeout, retries, volume mount, pinned packages.

No token, no network: building App/Image/Volume/Function objects is local in modal 1.x.
"""

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

modal = pytest.importorskip(
    "modal", reason="the Modal layer needs the 'remote' extra (pip install 'zoo[remote]')"
)

from zoo.config.loading import load_config  # noqa: E402
from zoo.remote import modal_app  # noqa: E402
from zoo.remote.status import RemoteTrainingError  # noqa: E402
from zoo.remote.submission import MAX_TIMEOUT_S, check_timeout, parse_gpu, remote_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def spec(gpu: str = "A100-80GB", timeout_s: int = 12 * 3600, retries: int = 5) -> modal_app.ModalSpec:
    return modal_app.ModalSpec("zoo-test-run", parse_gpu(gpu), timeout_s, retries, "zoo-test-volume")


@pytest.mark.parametrize(
    "text, kind, count, modal_spec",
    [
        ("A100-40GB", "A100-40GB", 1, "A100-40GB"),
        ("a100-80gb", "A100-80GB", 1, "A100-80GB"),
        ("H100", "H100", 1, "H100"),
        ("H100:8", "H100", 8, "H100:8"),
        ("l40s:2", "L40S", 2, "L40S:2"),
    ],
)
def test_gpu_strings(text, kind, count, modal_spec):
    gpu = parse_gpu(text)
    assert (gpu.kind, gpu.count, gpu.modal_spec) == (kind, count, modal_spec)


@pytest.mark.parametrize("text", ["V100", "H100:0", "H100:9", "A100:x", "", "H100:8:1"])
def test_bad_gpu_strings_are_refused(text):
    with pytest.raises(ValueError, match="GPU"):
        parse_gpu(text)


def test_timeouts_are_bounded_by_modal():
    assert check_timeout(12 * 3600) == 43200
    for bad in (10, MAX_TIMEOUT_S + 1):
        with pytest.raises(ValueError, match="24h"):
            check_timeout(bad)


def test_the_function_asks_modal_for_what_the_submission_says():
    built = modal_app.build_app(spec("H100:8", 6 * 3600, 3))
    assert built.app.name == "zoo-test-run"
    function_spec = built.function._spec_  # what modal will send: read back from the Function object
    assert function_spec.gpus == "H100:8"
    assert list(function_spec.volumes) == ["/vol"]
    assert repr(function_spec.volumes["/vol"]) == "modal.Volume.from_name('zoo-test-volume')"
    assert built.options["timeout"] == 6 * 3600
    retries = built.options["retries"]
    assert isinstance(retries, modal.Retries) and retries.max_retries == 3
    assert retries.max_delay.total_seconds() <= 60  # Modal's limit
    assert isinstance(built.options["volumes"]["/vol"], modal.Volume)
    assert built.function._tag_ == "remote_train"  # the module-level function the container imports


def test_one_gpu_runs_one_process_and_a_count_runs_torchrun():
    from zoo.remote.worker import RunPaths, worker_command

    paths = RunPaths(Path("/vol"), "r1")
    single = worker_command(paths, Path("c.json"), False, 1, "zoo modal submit")
    multi = worker_command(paths, Path("c.json"), True, 8, "zoo modal submit")
    assert single[1:3] == ["-m", "zoo.remote.worker"]
    # torchrun through zoo's launcher, which records how each failed rank ended
    assert multi[1:5] == [
        "-m",
        "zoo.training.launch",
        "--failures-file",
        "/vol/remote/r1/torchrun-failures.json",
    ]
    assert "--nproc_per_node=8" in multi and multi[-1] == "--resume"


def test_packages_are_the_local_install_pinned():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    packages = modal_app.pinned_packages()
    names = [re.match(r"[A-Za-z0-9._-]+", p).group(0) for p in packages]
    for requirement in declared:
        assert re.match(r"[A-Za-z0-9._-]+", requirement).group(0) in names
    assert "torch==2.14.1" in packages  # the CUDA build on Linux; the local +cu label dropped
    assert f"trackio=={importlib.metadata.version('trackio')}" in packages
    for package in packages:
        name = re.match(r"[A-Za-z0-9._-]+", package).group(0)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert package == f"{name}=={installed.split('+')[0]}"


def test_the_image_installs_the_pins_and_the_local_source(monkeypatch):
    calls = []
    image_class = modal.Image

    def spy(name):
        original = getattr(image_class, name)

        def wrapper(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("uv_pip_install", "env", "add_local_python_source"):
        monkeypatch.setattr(image_class, name, spy(name))
    modal_app.build_image(modal_app.pinned_packages())
    assert [c[0] for c in calls] == ["uv_pip_install", "env", "add_local_python_source"]
    assert list(calls[0][1]) == modal_app.pinned_packages()
    assert calls[1][1][0]["HF_HOME"].startswith("/vol/")
    assert calls[2][1] == ("zoo",)


def test_remote_config_moves_the_run_onto_the_volume():
    cfg = load_config("moons", ["train.steps=7"])
    remote = remote_config(cfg, "moons-remote-1")
    assert (remote.run_name, remote.output_dir, remote.device) == ("moons-remote-1", "/vol/outputs", "cuda")
    assert remote.data.root == "/vol/data" and remote.train.steps == 7
    assert remote.experiment_log == "/vol/outputs/moons-remote-1/experiment_log.md"
    with pytest.raises(ValueError, match="run name"):
        remote_config(cfg, "bad name!")


def test_only_modal_app_imports_modal():
    importers = [
        p.relative_to(REPO).as_posix()
        for p in sorted((REPO / "zoo").rglob("*.py")) + sorted((REPO / "zoo_cli").rglob("*.py"))
        if re.search(r"^\s*(import modal|from modal)", p.read_text(), flags=re.M)
    ]
    assert importers == ["zoo/remote/modal_app.py"]


class FakeCall:
    """A FunctionCall whose get() answers as Modal's client would."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome

    def get(self, timeout):
        assert timeout == 0  # a poll, never a wait
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    "outcome, state",
    [
        (TimeoutError(), ("running", None)),
        (modal.exception.OutputExpiredError(), ("finished", None)),
        ({"status": "finished"}, ("finished", None)),
        ({"status": "failed", "error": "RunError: not yours"}, ("failed", "RunError: not yours")),
        (modal.exception.FunctionTimeoutError("12h"), ("failed", "FunctionTimeoutError: 12h")),
        (modal.exception.RemoteError("terminated"), ("failed", "RemoteError: terminated")),
    ],
)
def test_call_state_reads_the_calls_outcome(monkeypatch, outcome, state):
    monkeypatch.setattr(modal.FunctionCall, "from_id", lambda call_id: FakeCall(outcome))
    result = modal_app.call_state("fc-1")
    assert (result.state, result.error) == state


def test_call_state_reports_the_runs_own_failure_and_lets_a_failure_to_ask_through(monkeypatch):
    from zoo.remote.worker import RemoteTrainingError

    monkeypatch.setattr(
        modal.FunctionCall, "from_id", lambda call_id: FakeCall(RemoteTrainingError("NCCL timeout"))
    )
    assert modal_app.call_state("fc-1").state == "failed"
    # No network, a bad token: that says nothing about the run, which must not be shown as failed.
    for error in (
        modal.exception.ConnectionError("unreachable"),
        modal.exception.AuthError("bad token"),
        OSError(),
    ):
        monkeypatch.setattr(modal.FunctionCall, "from_id", lambda call_id, error=error: FakeCall(error))
        with pytest.raises(type(error)):
            modal_app.call_state("fc-1")


def test_remote_train_lets_only_remote_training_errors_out(monkeypatch):
    from zoo.remote import worker

    class FakeVolume:
        def commit(self) -> None:
            pass

    monkeypatch.setattr(modal.Volume, "from_name", lambda name: FakeVolume())

    def broken_supervisor(**kwargs):
        raise OSError("the Volume went read-only")

    monkeypatch.setattr(worker, "supervise", broken_supervisor)
    with pytest.raises(
        worker.RemoteTrainingError, match="outside training: OSError: the Volume went read-only"
    ):
        modal_app.remote_train({"run_name": "r1"}, "sub-1", False, 1, "zoo-test-volume")


def test_call_state_reports_any_other_exception_of_the_call_as_its_failure(monkeypatch):
    # An exception Modal rebuilt from the container (an image without a module, say) is the run's failure.
    missing = ModuleNotFoundError("No module named 'zoo.remote.worker'")
    monkeypatch.setattr(modal.FunctionCall, "from_id", lambda call_id: FakeCall(missing))
    result = modal_app.call_state("fc-1")
    assert (result.state, result.error) == (
        "failed",
        "ModuleNotFoundError: No module named 'zoo.remote.worker'",
    )


def test_remote_train_reports_an_image_that_cannot_import_the_worker_as_its_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "zoo.remote.worker", None)  # importing it raises ModuleNotFoundError
    with pytest.raises(RemoteTrainingError, match="outside training: ModuleNotFoundError"):
        modal_app.remote_train({"run_name": "r1"}, "sub-1", False, 1, "zoo-test-volume")
