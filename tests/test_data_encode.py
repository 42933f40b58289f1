"""Encoding image folders into latents: what is encoded (against the VAE applied by hand),
resuming after an interruption (the same bytes as an uninterrupted run), what the loader checks,
and the command's refusals before any work."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from latent_helpers import CLASSES, make_image_folders, save_tiny_vae
from PIL import Image
from typer.testing import CliRunner

from zoo.config.loading import ConfigError
from zoo.config.schema import DataConfig
from zoo.data import DataNotFoundError, build_data
from zoo.data import encode as encoding
from zoo.data.encode import EncodeSettings, encode_folder, list_images
from zoo.errors import MissingAssetError, OutputPathError
from zoo.models.vae import SDVAE, TINY_VAE_CONFIG, load_vae
from zoo.runs import atomic_write_bytes
from zoo_cli.main import app


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encode")
    return {
        "vae": save_tiny_vae(root / "vae"),
        "images": make_image_folders(root / "imagenet", {"train": 4, "val": 1}),
    }


def encode(folders, out: Path, split: str = "train", **kwargs) -> dict:
    options = {"batch_size": 3, "device": "cpu"} | {
        k: kwargs.pop(k) for k in ("batch_size", "on_shard") if k in kwargs
    }
    settings = EncodeSettings(image_size=16, vae=str(folders["vae"]), **kwargs)
    return encode_folder(folders["images"], split, out, settings, **options)


def test_latents_are_the_vae_of_the_centre_crops_and_their_mirror_images(folders, tmp_path):
    out = tmp_path / "lat"
    summary = encode(folders, out, posterior="mean", flip_copies=True, shard_size=5)
    images = list_images(folders["images"] / "train")
    assert images.classes == list(CLASSES) and len(images.files) == 12
    vae = SDVAE.from_pretrained(folders["vae"])
    crops = []
    for path in images.files:  # centre square of the shorter side, bicubic to 16 px, by hand
        with Image.open(path) as image:
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            crop = (
                image.convert("RGB")
                .crop((left, top, left + side, top + side))
                .resize((16, 16), Image.BICUBIC)
            )
        crops.append(torch.from_numpy(np.asarray(crop).transpose(2, 0, 1).copy()))
    x = torch.stack(crops).float() / 127.5 - 1
    expected = torch.cat([vae.encode(x, sample=False), vae.encode(x.flip(-1), sample=False)])
    latents = np.load(out / "train_latents.npy")
    assert latents.dtype == np.float16 and latents.shape == (24, 4, 8, 8)
    assert torch.allclose(torch.from_numpy(latents).float(), expected, atol=2e-3)
    assert np.load(out / "train_labels.npy").tolist() == images.labels * 2
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vae"] == str(folders["vae"].resolve()) and meta["scale"] == pytest.approx(0.18215)
    assert meta["classes"] == list(CLASSES) and meta["latent_shape"] == [4, 8, 8]
    assert summary["items"] == 24 and summary["shards_encoded"] == 5 and summary["flip_copies"]
    assert not (out / ".train-shards").exists()


class Interrupted(Exception):
    pass


def test_an_interrupted_encoding_resumes_to_the_same_file(folders, tmp_path, monkeypatch):
    settings = {"flip_copies": True, "shard_size": 4, "posterior": "sample", "seed": 3}
    encode(folders, tmp_path / "whole", **settings)

    def stop_after_two(shard: int) -> None:
        if shard == 1:
            raise Interrupted

    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        encode(folders, out, on_shard=stop_after_two, **settings)
    assert sorted(p.name for p in (out / ".train-shards").glob("*.npz")) == ["000000.npz", "000001.npz"]
    assert not (out / "train_latents.npy").exists()
    with pytest.raises(ConfigError, match="differs in seed"):  # the shards must not be mixed with others
        encode(folders, out, **{**settings, "seed": 4})
    resumed = []
    summary = encode(folders, out, on_shard=resumed.append, **settings)
    assert resumed == [2, 3, 4, 5] and summary["shards_encoded"] == 4
    for name in ("train_latents.npy", "train_labels.npy"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    with pytest.raises(OutputPathError, match="encoded already"):
        encode(folders, out, **settings)

    # Cut off while assembling, after the labels file and before the latents file: the same
    # command assembles again.
    def labels_then_stop(path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data)
        if path.name == "train_labels.npy":
            raise Interrupted

    monkeypatch.setattr(encoding, "atomic_write_bytes", labels_then_stop)
    with pytest.raises(Interrupted):
        encode(folders, tmp_path / "assembling", **settings)
    assert (tmp_path / "assembling" / "train_labels.npy").exists()
    assert not (tmp_path / "assembling" / "train_latents.npy").exists()
    monkeypatch.undo()
    assert encode(folders, tmp_path / "assembling", **settings)["shards_encoded"] == 0
    for name in ("train_latents.npy", "train_labels.npy"):
        assert (tmp_path / "assembling" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # Another batch size draws the same noise; only the convolutions' rounding may differ.
    encode(folders, tmp_path / "batched", batch_size=5, **settings)
    other, whole = (
        np.load(tmp_path / f / "train_latents.npy").astype(np.float32) for f in ("batched", "whole")
    )
    assert np.allclose(other, whole, atol=2e-3) and not np.allclose(whole[:12], whole[12:], atol=0.1)


def test_the_loader_reads_the_encoding_and_checks_its_vae(folders, tmp_path):
    out = tmp_path / "imagenet-latents"
    encode(folders, out, split="train")
    encode(folders, out, split="val")
    cfg = DataConfig(name="imagenet-latents", root=str(tmp_path), class_conditional=True)
    source = build_data(cfg, "cpu", 0, 5)
    assert (source.data_shape, source.num_train, source.num_classes) == ((4, 8, 8), 12, 3)
    assert source.vae is load_vae(folders["vae"], "cpu")  # loaded once per process, shared
    images = source.decode(source.held_out(3))
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1

    # A split from another VAE than meta.json records is refused.
    summary_path = out / "val_encode.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "vae": "stabilityai/sd-vae-ft-mse"}))
    with pytest.raises(DataNotFoundError, match="must come from one VAE"):
        build_data(cfg, "cpu", 0, 5)
    summary_path.write_text(json.dumps(summary))
    # A decoder (data.vae) whose scale is not the latents' is refused.
    SDVAE.from_config(TINY_VAE_CONFIG | {"scaling_factor": 0.13025}).autoencoder.save_pretrained(
        tmp_path / "xl"
    )
    with pytest.raises(
        ConfigError, match="scales latents by 0.13025, but these latents were scaled by 0.18215"
    ):
        build_data(cfg.model_copy(update={"vae": str(tmp_path / "xl")}), "cpu", 0, 5)
    # Without a VAE (data.decode_latents=false) the data still loads.
    source = build_data(cfg.model_copy(update={"decode_latents": False}), "cpu", 0, 5)
    assert source.vae is None
    (out / "meta.json").unlink()
    with pytest.raises(DataNotFoundError, match="zoo data encode-latents"):
        build_data(cfg, "cpu", 0, 5)


def test_a_flat_folder_has_no_classes(tmp_path):
    for k in range(3):
        Image.new("RGB", (10, 12), (k, 0, 0)).save(tmp_path / f"{k}.jpg")
    images = list_images(tmp_path)
    assert (images.classes, images.labels, len(images.files)) == ([], [0, 0, 0], 3)
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataNotFoundError, match="both images and subfolders"):
        list_images(tmp_path)


@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    """No network to the hub, and a Hugging Face cache without the VAE (whatever this machine has)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_missing_vae_is_reported_at_once(tmp_path, empty_offline_hub):
    with pytest.raises(MissingAssetError, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
        SDVAE.from_pretrained("stabilityai/sd-vae-ft-ema")
    with pytest.raises(MissingAssetError, match="there is no folder"):
        SDVAE.from_pretrained(tmp_path / "no-such-vae")


def test_the_command_refuses_before_any_work(folders, tmp_path, empty_offline_hub):
    runner = CliRunner()
    out = tmp_path / "out"

    def run(*args: object):
        return runner.invoke(
            app, ["data", "encode-latents", str(folders["images"]), "--out", str(out), *map(str, args)]
        )

    result = run("--split", "train")  # the default VAE, not on this machine
    assert result.exit_code == 2 and "huggingface-cli download stabilityai/sd-vae-ft-ema" in result.output
    assert not out.exists()
    result = run("--split", "test", "--vae", folders["vae"])
    assert result.exit_code == 2 and "--split must be train or val" in result.output
    result = run("--split", "val", "--vae", folders["vae"], "--posterior", "mode")
    assert result.exit_code == 2 and "--posterior must be sample or mean" in result.output
    result = run("--split", "val", "--vae", folders["vae"], "--image-size", "15", "--device", "cpu")
    assert result.exit_code == 2 and "--image-size 15 is not a multiple of 2" in " ".join(
        result.output.split()
    )
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
def test_a_hub_id_in_the_local_cache_loads_without_the_network(folders, tmp_path, monkeypatch):
    """The hub-id path of from_pretrained, offline: a Hugging Face cache laid out as a download
    leaves it (refs/main -> snapshots/<revision>/), holding the tiny VAE's files."""
    import shutil

    from huggingface_hub import constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-ema"
    shutil.copytree(folders["vae"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = SDVAE.from_pretrained("stabilityai/sd-vae-ft-ema")
    reference = SDVAE.from_pretrained(folders["vae"])
    assert vae.name == "stabilityai/sd-vae-ft-ema"
    for (name, a), (_, b) in zip(vae.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_cheap_checks_come_before_the_vae_is_loaded(folders, tmp_path, monkeypatch):
    """A missing dataset, an --out that cannot be written or a split encoded already is reported
    without loading (or downloading) the VAE."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the VAE before the cheap checks")

    monkeypatch.setattr(encoding, "load_vae", must_not_load)
    with pytest.raises(DataNotFoundError, match="no image folder"):
        encode_folder(
            tmp_path / "nowhere",
            "train",
            tmp_path / "a",
            EncodeSettings(image_size=16),
            device="cpu",
            batch_size=2,
        )
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(OutputPathError):
        encode(folders, blocked)
    done = tmp_path / "done"
    done.mkdir()
    (done / "train_latents.npy").write_bytes(b"")
    with pytest.raises(OutputPathError, match="encoded already"):
        encode(folders, done)
    result = CliRunner().invoke(
        app,
        ["data", "encode-latents", str(tmp_path / "nowhere"), "--split", "val", "--out", str(tmp_path / "b")],
    )
    assert isinstance(result.exception, SystemExit) and "no image folder" in result.output, result.output


def test_a_missing_diffusers_names_the_extra_to_install(folders, tmp_path, monkeypatch):
    vae = shutil.copytree(folders["vae"], tmp_path / "vae")  # a path no earlier test has loaded (and cached)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    out = tmp_path / "out"
    args = ["data", "encode-latents", str(folders["images"]), "--split", "val", "--vae", str(vae)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and "pip install -e '.[vae]'" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (out / "val_latents.npy").exists()
