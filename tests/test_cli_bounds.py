"""Every command's numbers have bounds and its devices a fixed list: an out-of-range --nfe, --n or
--seed, or `--device tpu`, is refused before any work with exit 2 (never a run that cannot end,
never a traceback); a checkpoint with nothing but the format marker is one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.checkpoints import CHECKPOINT_FORMAT
from zoo.config import ConfigError
from zoo.config.schema import MAX_NFE, MAX_SAMPLE_BYTES
from zoo.errors import DeviceError
from zoo.inference import check_sample_count
from zoo_cli.main import app

runner = CliRunner()


def zoo(*args: object, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 5-step 2-D MeanFlow run, evaluated in batches of 200 (TINY_RUN)."""
    outputs = tmp_path_factory.mktemp("bounds") / "outputs"
    result = zoo("train", "moons", *TINY_RUN, f"output_dir={outputs}", "--steps", "5", "--run-name", "b")
    assert result.exit_code == 0, result.output
    return outputs / "b"


@pytest.mark.parametrize(
    "args, option",
    [
        (["sample", "RUN", "--nfe", "1000000000"], "--nfe"),
        (["sample", "RUN", "--nfe", str(MAX_NFE + 1)], "--nfe"),
        (["sample", "RUN", "--n", "100000000"], "--n"),
        (["sample", "RUN", "--seed", "-1"], "--seed"),
        (["sample", "RUN", "--seed", str(2**32)], "--seed"),
        (["sample", "RUN", "--guidance", "inf"], "--guidance"),
        (["sample", "RUN", "--class", "-1"], "--class"),
        (["sample", "RUN", "--threads", "100000"], "--threads"),
        (["eval", "RUN/last.pt", "--seed", "-1"], "--seed"),
        (["eval", "RUN/last.pt", "--n", "100000000"], "--n"),
        (["eval", "RUN/last.pt", "--fid", "--fid-nfe", "1000000000"], "--fid-nfe"),
        (["fid", "RUN", "--ref", "x.npz", "--nfe", "1000000000"], "--nfe"),
        (["fid", "RUN", "--ref", "x.npz", "--n", "1000000000"], "--n"),
        (["bench-jvp", "--repeats", "1000000000"], "--repeats"),
        (["bench-jvp", "--memory-limit-gb", "inf"], "--memory-limit-gb"),
        (["train", "moons", "--seed", "-1", "--run-name", "x"], "seed"),
    ],
)
def test_out_of_range_numbers_are_refused_before_any_work(tmp_path, monkeypatch, args, option):
    """RUN names no checkpoint: what is refused is refused before the checkpoint is looked for."""
    monkeypatch.chdir(tmp_path)
    result = zoo(*(a.replace("RUN", "gone") for a in args))
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["sample", "RUN", "--device", "tpu"],
        ["eval", "RUN/last.pt", "--device", "tpu"],
        ["fid", "RUN", "--ref", "x.npz", "--device", "tpu"],
        ["bench-jvp", "--device", "tpu"],
        ["data", "encode-latents", "imgs", "--split", "train", "--device", "tpu"],
    ],
)
def test_unknown_device_is_one_line_listing_the_devices(args):
    result = zoo(*(a.replace("RUN", "gone") for a in args))
    assert result.exit_code == 2, result.output
    assert result.output == (
        "error: --device 'tpu' is not a device zoo can use; choose one of auto, cpu, cuda, cuda:N, mps\n"
    )


def test_library_refuses_unknown_device_names():
    from zoo.devices import resolve_device

    with pytest.raises(DeviceError, match="'tpu' is not one zoo can use; choose one of auto, cpu"):
        resolve_device("tpu")


@pytest.mark.parametrize("command", [["sample"], ["eval"]])
def test_checkpoint_with_only_the_format_marker_is_one_line(tmp_path, command):
    marker_only = tmp_path / "marker.pt"
    torch.save({"format": CHECKPOINT_FORMAT}, marker_only)
    result = zoo(command[0], marker_only, *command[1:], "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert flat(result.output).startswith(
        f"error: {marker_only} is an incomplete zoo checkpoint (it has no config"
    )
    assert result.output.count("\n") == 1


def test_sample_count_is_bounded_by_the_bytes_it_holds():
    check_sample_count(1_000_000, (2,))
    per_image = 4 * 3 * 256 * 256
    check_sample_count(MAX_SAMPLE_BYTES // per_image, (3, 256, 256))
    with pytest.raises(ConfigError, match=f"pass --n {MAX_SAMPLE_BYTES // per_image} or less"):
        check_sample_count(MAX_SAMPLE_BYTES // per_image + 1, (3, 256, 256))


@pytest.mark.slow  # trains its 5-step checkpoint first: ~5 s of CPU
def test_sample_generates_in_batches_the_same_samples(run, tmp_path):
    """More samples than eval.batch_size (200): drawn batch by batch, equal to one full-batch draw."""
    from zoo.inference import load_model
    from zoo.solvers.samplers import sample_meanflow

    out = tmp_path / "s.png"
    result = zoo("sample", run, "--n", "450", "--seed", "3", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    written = np.load(out.with_suffix(".npz"))["samples"]
    model = load_model(run / "last.pt", torch.device("cpu")).model
    noise = torch.randn((450, 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = sample_meanflow(model, noise, 1).numpy()
    assert written.shape == (450, 2)
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-6)
