"""loss.jvp_kernels="triton": the fused JVP's group-norm tangent in two Triton kernels.

Checked here through Triton's interpreter (CPU tensors, the same kernels a GPU compiles), in a
subprocess (tests/kernel_checks.py): against torch.func.jvp of F.group_norm in float64, and
inside a whole fused MeanFlow step against the PyTorch-operations path.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tiny_runs import TINY_RUN
from zoo_cli.main import app

TESTS = Path(__file__).parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def in_interpreter(expression: str) -> str:
    """Evaluate `expression` (after `import kernel_checks`) with Triton's interpreter on; its JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    code = f"import json, kernel_checks; print(json.dumps({expression}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@needs_triton
def test_kernel_tangent_equals_forward_mode_ad_of_group_norm() -> None:
    lines = json.loads(in_interpreter("kernel_checks.tangent_errors()"))
    assert len(lines) == 10 and all(line.startswith("ok") for line in lines), "\n".join(lines)


@needs_triton
def test_fused_meanflow_step_with_the_kernels_equals_the_torch_operations() -> None:
    result = json.loads(in_interpreter("kernel_checks.fused_step_difference()"))
    assert result["kernel_calls"] == result["group_norms"] > 0, result  # every group norm's tangent took the kernels
    assert result["grad_norm"] > 0, result
    assert result["loss_relative_difference"] < 1e-5, result
    assert result["worst_grad_difference"] < 1e-4, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernels); none on this machine")
def test_compiled_cuda_kernels_equal_forward_mode_ad_and_the_torch_operations() -> None:
    import kernel_checks

    lines = kernel_checks.tangent_errors("cuda")
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)
    result = kernel_checks.fused_step_difference("cuda")
    assert result["kernel_calls"] == result["group_norms"] > 0 and result["grad_norm"] > 0, result
    assert result["loss_relative_difference"] < 1e-5 and result["worst_grad_difference"] < 1e-4, result


@pytest.mark.parametrize(
    "jvp, fix",
    [("fused", "loss.jvp_kernels=torch"), ("auto", "loss.jvp_kernels=torch"), ("nograd", "use loss.jvp=fused")],
)
def test_the_kernels_are_refused_where_they_cannot_run_with_the_fix(tmp_path, monkeypatch, jvp, fix) -> None:
    # On this CPU (or without Triton installed) for the fused mode; for another mode anywhere: it has no fused tangents.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(tmp_path)
    args = ["train", "moons", *TINY_RUN, f"loss.jvp={jvp}", "loss.jvp_kernels=triton", "--steps", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert fix in result.output, result.output
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())  # nothing written
