"""`zoo eval` end to end: FID through clean-fid's real pipeline (offline, with a small feature
network and reference statistics of real digits injected), its errors before any sampling,
--threads, --json checked first, the sample picture, and damaged checkpoints."""

import contextlib
import io
import json
import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from typer.testing import CliRunner

from zoo import evaluation
from zoo.inference import load_model
from zoo.metrics import fid as zoo_fid
from zoo.metrics.fid import FidBackend, FidReference
from zoo.solvers.samplers import sample_meanflow
from zoo_cli.main import app

pytest.importorskip("cleanfid", reason="clean-fid is the optional `fid` extra")

runner = CliRunner()
TINY_DIGITS = [
    "model.channels=8",
    "model.channel_mults=[1]",
    "model.attention_res=[]",
    "model.num_groups=4",
    "train.batch_size=16",
    "loss.jvp=nograd",
    "eval.n_samples=50",
    "eval.batch_size=50",
    "eval.meanflow_steps=[1]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]",
    "eval.grid_size=16",
    "experiment_log=",
    "tracking.enabled=false",
    "eval.features=off",  # 50 samples: energy distance (feature metrics: tests/test_eval_features.py)
    "--steps",
    "3",
    "--device",
    "cpu",
    "--threads",
    "1",
]


def zoo(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A real (3-step) MeanFlow U-Net on scikit-learn's digits: its last.pt."""
    root = tmp_path_factory.mktemp("digits-run")
    result = runner.invoke(
        app, ["train", "digits", *TINY_DIGITS, "--run-name", "dg", "output_dir=" + str(root)]
    )
    assert result.exit_code == 0, result.output
    return root / "dg" / "last.pt"


# --- an independent FID: PIL resizing, a fixed feature map, numpy statistics, scipy's sqrtm ------


def features_of(batch: torch.Tensor) -> torch.Tensor:
    """A small deterministic feature network: 4x4 average pooling of the first channel."""
    return F.adaptive_avg_pool2d(batch[:, :1].float(), 4).flatten(1)


def pixels_resized(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as clean-fid's "clean" mode feeds its network, computed here directly:
    8-bit values (as saved images), each channel resized to 299 x 299 bicubically in float."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().expand(-1, 3, -1, -1).numpy()
    out = np.empty((len(pixels), 3, 299, 299), dtype=np.float32)
    for i, image in enumerate(pixels):
        for c in range(3):
            resized = Image.fromarray(image[c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
            out[i, c] = np.asarray(resized).clip(0, 255)
    return torch.from_numpy(out)


def statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    feats = features_of(pixels_resized(images)).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


@pytest.fixture
def digits_reference(monkeypatch):
    """FID for "digits": reference statistics of the 1797 real digits; clean-fid's own
    resizing and feature plumbing, with features_of in place of Inception."""
    from sklearn.datasets import load_digits

    real = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16 * 2 - 1
    mu, sigma = statistics(real)
    reference = FidReference("digits", 8, "train")
    monkeypatch.setitem(zoo_fid.FID_REFERENCES, "digits", reference)
    monkeypatch.setattr(
        zoo_fid, "load_fid_backend", lambda ref, device: FidBackend(features_of, mu, sigma, ref)
    )
    return mu, sigma


def test_fid_end_to_end_matches_an_independent_computation(digits_run, digits_reference, tmp_path):
    out = tmp_path / "e.json"
    result = zoo(
        "eval",
        digits_run,
        "--fid",
        "--fid-n",
        120,
        "--fid-batch-size",
        40,
        "--seed",
        3,
        "--json",
        out,
        "--device",
        "cpu",
        "--threads",
        1,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["fid"]["n_samples"] == 120 and data["fid"]["method"] == "MeanFlow 1-step"
    row = next(r for r in data["rows"] if r["kind"] == "meanflow" and r["steps"] == 1)
    assert row["fid"] == data["fid"]["value"] and "energy_distance" in row
    assert all("fid" not in r for r in data["rows"] if r is not row)
    assert "FID" in result.output and "digits train statistics" in result.output

    # The same 120 images, drawn as the evaluation draws them (seed 3, batches of 40).
    model = load_model(digits_run, torch.device("cpu")).model
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        images = torch.cat(
            [sample_meanflow(model, torch.randn((40, 1, 8, 8), generator=generator), 1) for _ in range(3)]
        )
    truth = scipy_frechet(*statistics(images), *digits_reference)
    assert data["fid"]["value"] == pytest.approx(truth, rel=1e-6)
    # A distance that can tell: 120 real digits score far lower than a 3-step model's samples.
    from sklearn.datasets import load_digits

    real = torch.from_numpy(load_digits().images[:120]).float().unsqueeze(1) / 16 * 2 - 1
    assert truth > 5 * scipy_frechet(*statistics(real), *digits_reference)

    picture = out.with_suffix(".png")
    assert picture.exists() and Image.open(picture).size[0] > 8 * 4


def test_fid_unavailable_offline_is_one_line_before_any_sampling(digits_run, tmp_path, monkeypatch):
    """The real load_fid_backend with clean-fid's downloads cut off (as on this machine)."""
    import cleanfid.downloads_helper as helper

    stats = zoo_fid.cleanfid_stats_dir() / "digits_clean_train_8.npz"
    if (zoo_fid.INCEPTION_DIR / "inception-2015-12-05.pt").exists() and stats.exists():
        pytest.skip("clean-fid's files are present here: nothing to download")

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(helper.urllib.request, "urlopen", offline)
    monkeypatch.setitem(zoo_fid.FID_REFERENCES, "digits", FidReference("digits", 8, "train"))
    sampled = []
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: sampled.append(1))
    out = tmp_path / "e.json"
    result = zoo("eval", digits_run, "--fid", "--json", out, "--device", "cpu")
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert line.startswith("error: FID could not download clean-fid's files (network unreachable)")
    assert "inception-2015-12-05.pt as /tmp/inception-2015-12-05.pt" in line and str(stats) in line
    assert "Traceback" not in result.output and sampled == [] and not out.exists()


def test_a_download_cut_off_midway_leaves_no_partial_file(digits_run, tmp_path, monkeypatch):
    """clean-fid writes straight into its target; a connection reset halfway left a file every
    later --fid failed to load.  zoo removes what the failed download began."""
    import cleanfid.downloads_helper as helper

    inception = zoo_fid.INCEPTION_DIR / "inception-2015-12-05.pt"
    if inception.exists():
        pytest.skip("clean-fid's Inception weights are present here: nothing is downloaded")

    class CutOff(io.RawIOBase):
        sent = False

        def readable(self):
            return True

        def readinto(self, buffer):
            if self.sent:
                raise ConnectionResetError("connection reset by peer")
            self.sent = True
            buffer[:4] = b"PK\x03\x04"
            return 4

    def cut_off(url, *args, **kwargs):
        assert socket.getdefaulttimeout() == zoo_fid.DOWNLOAD_TIMEOUT_S  # no endless hang either
        return contextlib.closing(io.BufferedReader(CutOff()))

    monkeypatch.setattr(helper.urllib.request, "urlopen", cut_off)
    monkeypatch.setitem(zoo_fid.FID_REFERENCES, "digits", FidReference("digits", 8, "train"))
    try:
        result = zoo("eval", digits_run, "--fid", "--json", tmp_path / "e.json", "--device", "cpu")
        assert result.exit_code == 1, result.output
        assert "ConnectionResetError: connection reset by peer" in " ".join(result.output.split())
        assert not inception.exists() and socket.getdefaulttimeout() is None
    finally:
        inception.unlink(missing_ok=True)


def test_fid_refuses_datasets_without_statistics_and_bad_options(digits_run, tmp_path):
    result = zoo("eval", digits_run, "--fid", "--json", tmp_path / "e.json", "--device", "cpu")
    assert result.exit_code == 2
    assert "exist for cifar10 only, not for digits" in " ".join(result.output.split())
    result = zoo("eval", digits_run, "--fid-n", 100, "--device", "cpu")
    assert result.exit_code == 2 and "add --fid" in result.output
    result = zoo("eval", digits_run, "--fid", "--fid-solver", "heun", "--fid-nfe", 3, "--device", "cpu")
    assert result.exit_code == 2 and "multiple of 2" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "option, value",
    [("--fid-n", 50_000), ("--fid-solver", "meanflow"), ("--fid-nfe", 1), ("--fid-batch-size", 50)],
)
def test_an_fid_option_without_fid_is_a_usage_error_even_at_its_default_value(
    digits_run, tmp_path, option, value
):
    result = zoo("eval", digits_run, option, value, "--json", tmp_path / "e.json", "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert f"{option} given without --fid" in line and "add --fid" in line
    assert not list(tmp_path.iterdir())


def test_fid_puts_a_training_model_back_in_training_mode_when_it_fails(digits_run):
    """Sampled in eval mode (no dropout), and back in the caller's mode however FID ends."""
    loaded = load_model(digits_run, torch.device("cpu"))
    model = loaded.model.train()
    modes = []

    def failing_features(batch):
        modes.append(model.training)
        raise RuntimeError("the feature network failed")

    backend = FidBackend(failing_features, np.zeros(16), np.eye(16), FidReference("digits", 8, "train"))
    with pytest.raises(RuntimeError, match="the feature network failed"):
        evaluation.evaluate_fid(
            model, evaluation.Method("meanflow", 1, 1), backend, 8, 4, loaded.cfg.eval.guidance
        )
    assert modes == [False] and model.training


def test_missing_clean_fid_says_how_to_install(digits_run, tmp_path, monkeypatch):
    real_find_spec = zoo_fid.importlib.util.find_spec
    monkeypatch.setattr(
        zoo_fid.importlib.util, "find_spec", lambda name: None if name == "cleanfid" else real_find_spec(name)
    )
    monkeypatch.setitem(zoo_fid.FID_REFERENCES, "digits", FidReference("digits", 8, "train"))
    result = zoo("eval", digits_run, "--fid", "--json", tmp_path / "e.json", "--device", "cpu")
    assert result.exit_code == 1 and "pip install clean-fid" in result.output


def test_json_path_checked_before_the_evaluation(digits_run, monkeypatch):
    sampled = []
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: sampled.append(1))
    result = zoo("eval", digits_run, "--json", "/proc/e.json", "--device", "cpu")
    assert result.exit_code == 2 and "cannot write --json /proc/e.json" in result.output
    assert "Traceback" not in result.output and sampled == []


def test_threads_option_sets_torch_threads(digits_run, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    result = zoo(
        "eval", digits_run, "--threads", 1, "--n", 50, "--json", tmp_path / "e.json", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert seen == [1] and (tmp_path / "e.png").exists()


def test_flipped_byte_in_last_pt_stops_sample_eval_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "digits", *TINY_DIGITS, "--run-name", "flip"])
    assert result.exit_code == 0, result.output
    last = tmp_path / "outputs" / "flip" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01
    last.write_bytes(bytes(data))
    for args in (
        ["sample", last, "--device", "cpu"],
        ["eval", last, "--device", "cpu"],
        ["train", "digits", *TINY_DIGITS, "--run-name", "flip", "--resume", "--steps", "6"],
    ):
        result = zoo(*args)
        assert result.exit_code == 1, (args, result.output)
        line = " ".join(result.output.split())
        assert (
            f"{last.relative_to(tmp_path)} does not match its checksum" in line
            or f"{last} does not match" in line
        )
        assert "Traceback" not in result.output
