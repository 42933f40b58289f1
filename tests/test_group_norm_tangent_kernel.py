"""loss.jvp_kernels="triton": the fused JVP's group-norm tangent in two Triton kernels.

Checked here through Triton's interpreter (CPU tensors, the same kernels a GPU compiles), in a
subprocess (tests/kernel_checks.py): against torch.func.jvp of F.group_norm in float64, and
inside a whole fused MeanFlow step: as close to the step in float64 as the PyTorch-operations path.
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.config.loading import load_config
from zoo.models import build_model, group_norm_tangent_kernel, tangents
from zoo.training.jvp_plan import group_norm_tangents, plan_run
from zoo_cli.main import app

TESTS = Path(__file__).parent
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def in_interpreter(expression: str) -> str:
    """Evaluate `expression` (after `import kernel_checks`) with Triton's interpreter on; its JSON."""
    # Keep the caller's PYTHONPATH after ours: where the dependencies come from it (the GPU machine's
    # /tmp/site), the subprocess needs it too.
    path = [str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    code = f"import json, kernel_checks; print(json.dumps({expression}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The checks' results from one interpreter subprocess (each start imports torch and Triton).
    The first-launch check first, as in a run, before anything else has launched the kernels."""
    checks = ("first_launch_failure", "tangent_errors", "fused_step_errors")
    return json.loads(in_interpreter("{" + ", ".join(f"'{c}': kernel_checks.{c}()" for c in checks) + "}"))


@needs_triton
def test_kernel_tangent_equals_forward_mode_ad_of_group_norm(interpreted) -> None:
    lines = interpreted["tangent_errors"]
    assert len(lines) == 10 and all(line.startswith("ok") for line in lines), "\n".join(lines)


def assert_kernels_as_accurate_as_the_torch_operations(result: dict[str, float]) -> None:
    """Both fp32 paths against the float64 step: the kernels' errors within a small factor of the
    PyTorch operations' (both are fp32 rounding, summed in different orders); a wrong tangent
    anywhere would err by orders of magnitude more (the loss's target carries it)."""
    assert result["kernel_calls"] == result["group_norms"] > 0, (
        result
    )  # every group norm's tangent took the kernels
    assert result["grad_norm"] > 0, result
    for what in ("loss", "grad"):
        torch_error, triton_error = result[f"torch_{what}_error"], result[f"triton_{what}_error"]
        assert torch_error < 1e-3, result  # the fp32 step itself is close to float64
        assert triton_error <= 4 * torch_error + 1e-6, result


@needs_triton
def test_fused_meanflow_step_with_the_kernels_is_as_accurate_as_the_torch_operations(interpreted) -> None:
    assert_kernels_as_accurate_as_the_torch_operations(interpreted["fused_step_errors"])


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (compiled Triton kernels); none on this machine",
)
def test_compiled_cuda_kernels_equal_forward_mode_ad_and_the_torch_operations() -> None:
    import kernel_checks

    assert group_norm_tangent_kernel.first_launch_failure(torch.device("cuda")) is None
    lines = kernel_checks.tangent_errors("cuda")
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)
    assert_kernels_as_accurate_as_the_torch_operations(kernel_checks.fused_step_errors("cuda"))


@pytest.mark.parametrize(
    "jvp, fix",
    [
        ("fused", "loss.jvp_kernels=torch"),
        ("auto", "loss.jvp_kernels=torch"),
        ("nograd", "use loss.jvp=fused"),
    ],
)
def test_the_kernels_are_refused_where_they_cannot_run_with_the_fix(tmp_path, monkeypatch, jvp, fix) -> None:
    # On this CPU (or without Triton installed) for the fused mode; for another mode anywhere: it
    # has no fused tangents.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        "moons",
        *TINY_RUN,
        f"loss.jvp={jvp}",
        "loss.jvp_kernels=triton",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert fix in result.output, result.output
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())  # nothing written


def pretend_cuda_with_triton(monkeypatch, first_launch_failure: str | None = None) -> list[str]:
    """As on a CUDA machine with Triton installed whose first launch gives `first_launch_failure`;
    the devices the first launch was tried on, as they are tried."""
    tried = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(group_norm_tangent_kernel, "installed", lambda: True)
    monkeypatch.setattr(group_norm_tangent_kernel, "first_launches", {})
    monkeypatch.setattr(
        group_norm_tangent_kernel,
        "first_launch_failure",
        lambda device: tried.append(str(device)) or first_launch_failure,
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return tried


def test_auto_takes_the_kernels_on_cuda_where_they_can_run_and_the_torch_operations_elsewhere(
    monkeypatch,
) -> None:
    resolve = group_norm_tangent_kernel.resolve
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    pretend_cuda_with_triton(monkeypatch)
    assert (resolve("auto", cuda), resolve("auto", cpu)) == ("triton", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter: only when a test asks for "triton"
    assert (resolve("auto", cuda), resolve("auto", cpu), resolve("triton", cpu)) == (
        "torch",
        "torch",
        "triton",
    )
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(group_norm_tangent_kernel, "installed", lambda: False)
    assert (resolve("auto", cuda), resolve("torch", cuda)) == ("torch", "torch")


def test_a_run_says_how_its_group_norm_tangents_run(monkeypatch) -> None:
    pretend_cuda_with_triton(monkeypatch)
    cfg = load_config(
        "digits",
        ["model.channels=8", "model.channel_mults=[1]", "model.attention_res=[]", "model.num_groups=4"],
    )
    unet = build_model(cfg.model, (1, 8, 8), 10)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert "Triton kernels" in group_norm_tangents(unet, cuda, "auto", compiled=False)
    assert "PyTorch operations" in group_norm_tangents(unet, cpu, "auto", compiled=False)
    assert "PyTorch operations" in group_norm_tangents(unet, cuda, "torch", compiled=False)
    assert "inductor" in group_norm_tangents(unet, cuda, "auto", compiled=True)
    fused = plan_run(cfg, cuda)
    assert "group-norm tangents: Triton kernels" in fused.describe(unet, cuda)
    nograd = plan_run(cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"jvp": "nograd"})}), cuda)
    assert "group-norm tangents" not in nograd.describe(unet, cuda)  # no fused tangents
    moons = load_config("moons", [])
    assert group_norm_tangents(build_model(moons.model, (2,), 0), cuda, "auto", compiled=False) is None


def test_auto_falls_back_to_the_torch_operations_when_the_kernels_fail_their_first_launch(
    monkeypatch,
) -> None:
    tried = pretend_cuda_with_triton(
        monkeypatch, first_launch_failure="RuntimeError: Failed to find C compiler"
    )
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="Failed to find C compiler.*loss.jvp_kernels=torch"):
        assert group_norm_tangent_kernel.resolve("auto", cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device: no second attempt, no second warning
        assert group_norm_tangent_kernel.resolve("auto", torch.device("cuda:0")) == "torch"
    assert tried == ["cuda:0"]
    with pytest.warns(UserWarning, match="failed on cuda:1"):  # another device: tried (and warned) on its own
        assert group_norm_tangent_kernel.resolve("auto", torch.device("cuda:1")) == "torch"
    assert tried == ["cuda:0", "cuda:1"]
    assert (
        group_norm_tangent_kernel.resolve("triton", cuda) == "triton"
    )  # forced: its errors are the user's to see
    cfg = load_config(
        "digits",
        ["model.channels=8", "model.channel_mults=[1]", "model.attention_res=[]", "model.num_groups=4"],
    )
    note = group_norm_tangents(build_model(cfg.model, (1, 8, 8), 10), cuda, "auto", compiled=False)
    assert "PyTorch operations" in note and "Failed to find C compiler" in note


def test_the_first_launch_check_catches_kernels_that_raise_or_compute_wrongly(monkeypatch) -> None:
    # On the CPU, with the kernel replaced: what the check makes of each outcome.
    def torch_tangent(x, dx, weight, mean, rstd, groups):
        n = x.shape[0]
        return tangents.group_norm_tangent(
            x, dx, weight, mean.reshape(n, groups, 1), rstd.reshape(n, groups, 1), groups
        )

    check, cpu = group_norm_tangent_kernel.first_launch_failure, torch.device("cpu")
    monkeypatch.setattr(group_norm_tangent_kernel, "group_norm_tangent", torch_tangent)
    assert check(cpu) is None
    monkeypatch.setattr(group_norm_tangent_kernel, "group_norm_tangent", lambda *a: 1.01 * torch_tangent(*a))
    assert "differed" in check(cpu)

    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")

    monkeypatch.setattr(group_norm_tangent_kernel, "group_norm_tangent", no_compiler)
    assert (
        check(cpu) == "RuntimeError: Failed to find C compiler. Please specify via CC environment variable."
    )


def test_auto_never_launches_inside_a_graph_capture(monkeypatch) -> None:
    tried = pretend_cuda_with_triton(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert group_norm_tangent_kernel.resolve("auto", torch.device("cuda")) == "torch" and tried == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert group_norm_tangent_kernel.resolve("auto", torch.device("cuda")) == "triton" and tried == ["cuda:0"]


@needs_triton
def test_the_first_launch_check_passes_the_real_kernels(interpreted) -> None:
    # Through the interpreter on the CPU: the check's own code (shapes, the comparison) is right,
    # so a real device's failure is the kernels', not the check's.
    assert interpreted["first_launch_failure"] is None
