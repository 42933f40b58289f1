"""Latent generation end to end, offline: image folders -> `zoo data encode-latents` (a tiny
random AutoencoderKL loaded from a local folder by the real from_pretrained path) -> `zoo train`
a tiny class-conditional DiT on the latents -> decoded training grid -> `zoo sample --classes`
decoded, one row per class -> FID and IS with a small random CNN in Inception's place."""

import json
import math

import numpy as np
import pytest
import torch
from latent_helpers import TinyFeatures, make_image_folders, save_tiny_vae
from PIL import Image
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.evaluation import Method
from zoo.inference import load_model
from zoo.metrics import inception
from zoo.metrics.inception import folder_reference
from zoo.models.vae import SDVAE, decode_latents
from zoo.scoring import score_model
from zoo_cli.main import app
from zoo_cli.sample import parse_classes

runner = CliRunner()
TINY_DIT = ["model.size=none", "model.hidden=32", "model.depth=1", "model.heads=2", "model.patch_size=2"]


def zoo(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("latents")
    vae = save_tiny_vae(root / "vae")
    make_image_folders(root / "data" / "imagenet", {"train": 6, "val": 2})
    common = ["--image-size", 16, "--vae", vae, "--batch-size", 4, "--num-workers", 0, "--device", "cpu"]
    for split, extra in (("train", ["--flip", "--shard-size", 8]), ("val", [])):
        result = zoo("data", "encode-latents", root / "data" / "imagenet", "--split", split, *common, *extra)
        assert result.exit_code == 0, result.output
    latents = np.load(root / "data" / "imagenet-latents" / "train_latents.npy")
    assert latents.shape == (36, 4, 8, 8)  # 18 images and their mirror images, 16 px -> 8x8 latents
    # adaLN-zero makes the class's effect on the output the product of the class embedding and
    # two zero-initialised layers: after 4 steps at the default rate (6e-4) guidance 3 moves a
    # sample by ~1e-7, which no decoded pixel shows. At 3e-2 it moves a third of the pixels,
    # so the guidance tests compare models that do depend on the class.
    result = zoo(
        "train",
        "imagenet-latents",
        *TINY_RUN,
        *TINY_DIT,
        "optim.lr=3e-2",
        f"data.root={root / 'data'}",
        f"output_dir={root / 'outputs'}",
        "train.batch_size=8",
        "eval.n_samples=16",
        "eval.grid_size=6",
        "tracking.enabled=false",
        "--steps",
        4,
        "--run-name",
        "lat",
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "vae": vae, "run": root / "outputs" / "lat"}


def test_training_grids_show_decoded_images(trained):
    grid = np.asarray(Image.open(trained["run"] / "samples" / "final.png"))
    # 6 decoded 16 px images in 3 columns: 3 * (16 + 2) + 2 = 56 px, enlarged 5x to reach 256 px.
    # (Undecoded 8 px latents would make a 32 px grid, enlarged 8x: 256 px.)
    assert grid.shape[1] == 5 * 56


def test_sample_decodes_and_lays_classes_out_in_rows(trained, tmp_path):
    out = tmp_path / "s.png"
    result = zoo("sample", trained["run"], "--classes", "0-2", "--latents", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "decoded by" in result.output
    saved = np.load(out.with_suffix(".npz"))
    assert saved["samples"].shape == (24, 3, 16, 16) and saved["latents"].shape == (24, 4, 8, 8)
    assert saved["labels"].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    vae = SDVAE.from_pretrained(trained["vae"])
    expected = vae.decode(torch.from_numpy(saved["latents"])).clamp(-1, 1)
    assert torch.allclose(torch.from_numpy(saved["samples"]), expected, atol=1e-5)
    assert np.abs(saved["samples"]).max() <= 1
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == (2 * (3 * 18 + 2), 2 * (8 * 18 + 2))  # 3 rows of 8, enlarged 2x


def test_class_options_are_checked_before_sampling(trained, tmp_path):
    assert parse_classes("0-3,10, 7") == [0, 1, 2, 3, 10, 7]
    out = ["--out", tmp_path / "x.png", "--device", "cpu"]
    for args, message in (
        (["--classes", "0-9"], "--classes must be in 0..2, got 3"),
        (["--classes", "0-2", "--n", "10"], "--n 10 does not split evenly over the 3 classes"),
        (["--classes", "2-0"], "runs backwards"),
        (["--classes", "a-b"], "class numbers and ranges"),
        (["--class", "1", "--classes", "0-2"], "not both"),
        (["--vae", tmp_path / "none"], "there is no folder"),
    ):
        result = zoo("sample", trained["run"], *args, *out)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "x.png").exists()


def test_fid_of_decoded_samples_with_a_stand_in_feature_network(trained, tmp_path):
    loaded = load_model(trained["run"] / "last.pt", torch.device("cpu"))
    features = TinyFeatures()
    starts = []
    val = trained["root"] / "data" / "imagenet" / "val"
    reference = folder_reference(
        val, features, 16, tmp_path, on_start=lambda n, cached: starts.append(cached)
    )
    again = folder_reference(val, features, 16, tmp_path, on_start=lambda n, cached: starts.append(cached))
    assert starts == [False, True] and np.array_equal(reference.sigma, again.sigma) and reference.count == 6
    vae = SDVAE.from_pretrained(trained["vae"])
    batches = []
    scores = score_model(
        loaded.model,
        Method("meanflow", 1, 1),
        1.0,
        features,
        reference,
        n=30,
        batch_size=8,
        decode=lambda z: decode_latents(vae, z),
        decoded_by=vae.name,
        on_batch=batches.append,
    )
    assert batches == [8, 8, 8, 6] and scores.n_samples == 30 and scores.class_balanced
    assert math.isfinite(scores.fid) and scores.fid > 0
    assert 1.0 <= scores.inception_score <= 10.0
    assert (scores.sampler, scores.nfe, scores.guidance) == ("MeanFlow 1-step", 1, 1.0)
    assert "decoded by" in scores.summary() and str(val) in scores.reference


def test_zoo_fid_scores_a_latent_run_against_a_folder(trained, tmp_path, monkeypatch):
    """The command's whole path (folder statistics, decoding, JSON), Inception replaced by the CNN."""
    monkeypatch.setattr(inception, "InceptionV3", lambda device, resize: TinyFeatures())
    val = trained["root"] / "data" / "imagenet" / "val"
    out = tmp_path / "fid.json"
    args = ["--ref", val, "--n", 12, "--batch-size", 5, "--stats-cache", tmp_path, "--out", out]
    result = zoo("fid", trained["run"], *args, "--device", "cpu", "--num-workers", 0)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["n_samples"] == 12 and saved["class_balanced"] and saved["decoded_by"] == str(trained["vae"])
    assert (saved["sampler"], saved["nfe"], saved["guidance"]) == ("MeanFlow 1-step", 1, 1.0)
    assert math.isfinite(saved["fid"]) and f"FID {saved['fid']:.3f}" in result.output
    assert len(list(tmp_path.glob("16px-none-*.npz"))) == 1  # the folder's statistics, cached


def test_eval_pictures_decoded_images_and_plots_quality_vs_nfe(trained, tmp_path):
    out = tmp_path / "e.json"
    result = zoo("eval", trained["run"], "--n", 16, "--json", out, "--device", "cpu", "--threads", 1)
    assert result.exit_code == 0, result.output
    # the same decoded 16 px grid as training's (undecoded 8 px latents would give 256 px, 8x)
    assert np.asarray(Image.open(out.with_suffix(".png"))).shape[1] == 5 * 56
    data = json.loads(out.read_text())
    assert "features" not in data and data["rows"]  # latents: energy distance, no feature network
    assert Image.open(tmp_path / "e_quality.png").size[0] > 300


def test_eval_fid_of_a_latent_run_is_the_number_zoo_fid_gives(trained, tmp_path, monkeypatch):
    """`zoo eval --fid --fid-ref` decodes and scores as `zoo fid` does (Inception replaced by the CNN)."""
    monkeypatch.setattr(inception, "InceptionV3", lambda device, resize: TinyFeatures())
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    val = trained["root"] / "data" / "imagenet" / "val"
    out = tmp_path / "e.json"
    refused = zoo("eval", trained["run"], "--n", 16, "--fid", "--json", out, "--device", "cpu")
    assert refused.exit_code == 2 and "add --fid-ref" in " ".join(refused.output.split()) and not out.exists()
    fid_args = ["--fid", "--fid-ref", val, "--fid-n", 12, "--fid-batch-size", 5]
    result = zoo("eval", trained["run"], "--n", 16, *fid_args, "--json", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    args = ["--ref", val, "--n", 12, "--batch-size", 5, "--out", tmp_path / "f.json", "--num-workers", 0]
    alone = zoo(
        "fid", trained["run"], *args, "--stats-cache", tmp_path / "cache" / "fid-stats", "--device", "cpu"
    )
    assert alone.exit_code == 0, alone.output
    expected = json.loads((tmp_path / "f.json").read_text())
    data = json.loads(out.read_text())
    assert data["fid"]["value"] == pytest.approx(expected["fid"], rel=1e-9) and data["fid"]["n_samples"] == 12
    row = next(r for r in data["rows"] if (r["kind"], r["steps"]) == ("meanflow", 1))
    assert row["fid"] == data["fid"]["value"] and str(val) in data["fid"]["reference"]


def test_eval_fid_is_measured_at_the_guidance_asked_for(trained, tmp_path, monkeypatch):
    """`zoo eval --guidance 3 --fid` scores guided samples: `zoo fid --guidance 3`'s FID and IS, not
    the run's default scale's, on the guidance-3 row, with the scale named in the report."""
    monkeypatch.setattr(inception, "InceptionV3", lambda device, resize: TinyFeatures())
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    val = trained["root"] / "data" / "imagenet" / "val"
    out = tmp_path / "e.json"
    fid_args = ["--fid", "--fid-ref", val, "--fid-n", 12, "--fid-batch-size", 5]
    fid_args += ["--guidance", 3]
    result = zoo("eval", trained["run"], "--n", 16, *fid_args, "--json", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    common = ["--ref", val, "--n", 12, "--batch-size", 5, "--num-workers", 0, "--device", "cpu"]
    common += ["--stats-cache", tmp_path / "cache" / "fid-stats"]
    by_guidance = {}
    for g in (3, 1):
        alone = zoo("fid", trained["run"], *common, "--guidance", g, "--out", tmp_path / f"f{g}.json")
        assert alone.exit_code == 0, alone.output
        by_guidance[g] = json.loads((tmp_path / f"f{g}.json").read_text())
    fid = data["fid"]
    assert fid["value"] == pytest.approx(by_guidance[3]["fid"], rel=1e-9)
    assert abs(by_guidance[1]["fid"] - by_guidance[3]["fid"]) > 1e-6 * by_guidance[3]["fid"]
    assert fid["guidance"] == 3 and fid["inception_score"] == pytest.approx(by_guidance[3]["inception_score"])
    row = next(r for r in data["rows"] if (r["kind"], r["steps"], r["guidance"]) == ("meanflow", 1, 3))
    assert row["fid"] == fid["value"] and row["inception_score"] == fid["inception_score"]
    assert "IS" in result.output and "guidance 3" in " ".join(result.output.split())


def test_eval_fid_checks_its_reference_before_loading_anything(trained, tmp_path, monkeypatch):
    """A missing --fid-ref is reported before the checkpoint, its data or its VAE are loaded."""
    from zoo import checkpoint_eval

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a checkpoint before checking --fid-ref")

    monkeypatch.setattr(checkpoint_eval, "load_model", must_not_load)
    missing = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    out = tmp_path / "e.json"
    args = ["--fid", "--fid-ref", missing, "--data-dir", tmp_path / "no-data", "--json", out]
    result = zoo("eval", trained["run"], *args, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert f"no reference statistics at {missing}" in " ".join(result.output.split()) and not out.exists()
