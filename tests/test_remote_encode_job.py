"""`zoo data encode-latents --modal` without Modal's servers: the function object it would send,
requests confined to the Volume, and the container's body run against a folder as the Volume."""

import numpy as np
import pytest
from latent_helpers import make_image_folders, save_tiny_vae
from typer.testing import CliRunner

from zoo.data.encode import EncodeSettings
from zoo.remote.encode_job import encode_request, run_encode_request
from zoo_cli.main import app

modal = pytest.importorskip("modal", reason="the Modal layer needs the 'remote' extra")

from zoo.remote import modal_app  # noqa: E402
from zoo.remote.submission import parse_gpu  # noqa: E402


def test_the_encode_function_asks_for_a_gpu_cpus_and_the_volume():
    spec = modal_app.ModalSpec("zoo-encode-x", parse_gpu("A100-40GB"), 7200, 3, "zoo-test-volume")
    built = modal_app.build_encode_app(spec)
    function_spec = built.function._spec_
    assert (function_spec.gpus, function_spec.cpu) == ("A100-40GB", modal_app.ENCODE_CPUS)
    assert repr(function_spec.volumes["/vol"]) == "modal.Volume.from_name('zoo-test-volume')"
    assert built.options["timeout"] == 7200 and built.options["retries"].max_retries == 3
    assert built.function._tag_ == "remote_encode"  # the module-level function the container imports


def test_requests_stay_inside_the_volumes_data_folder():
    settings = EncodeSettings()
    request = encode_request("imagenet", "val", None, settings, batch_size=64, num_workers=8, limit=None)
    assert (request["dataset"], request["out"], request["device"]) == ("imagenet", "imagenet-latents", "cuda")
    assert request["app_name"] == "zoo-encode-imagenet-latents-val"
    for bad in ("/data/imagenet", "../imagenet", "."):
        with pytest.raises(ValueError, match="folder under the Volume's data/"):
            encode_request(bad, "train", None, settings, batch_size=64, num_workers=8, limit=None)


def test_a_bad_remote_dataset_is_refused_before_modal_is_asked():
    result = CliRunner().invoke(
        app, ["data", "encode-latents", "/abs/imagenet", "--split", "train", "--modal"]
    )
    assert result.exit_code == 2 and "folder under the Volume's data/" in result.output


def test_a_vae_only_this_machine_has_is_refused_before_modal_is_asked(tmp_path):
    for local in (str(tmp_path / "vae"), "~/vae", "../vae"):
        result = CliRunner().invoke(
            app, ["data", "encode-latents", "imagenet", "--split", "train", "--modal", "--vae", local]
        )
        assert result.exit_code == 2 and "is a path on this machine" in result.output, result.output
        assert len(result.output.strip().splitlines()) <= 3  # one message, wrapped by the terminal width
    for remote in ("stabilityai/sd-vae-ft-ema", "vae/sd-vae-ft-ema", "./my-vae"):
        request = encode_request(
            "imagenet", "val", None, EncodeSettings(vae=remote), batch_size=8, num_workers=0, limit=None
        )
        assert request["settings"]["vae"] == remote.removeprefix("./")


def test_the_container_encodes_from_the_volume_and_commits_after_each_shard(tmp_path):
    volume = tmp_path / "vol"
    make_image_folders(volume / "data" / "imagenet", {"train": 2})  # 6 images
    save_tiny_vae(volume / "data" / "vae" / "tiny")  # the VAE uploaded to the Volume
    settings = EncodeSettings(image_size=16, vae="vae/tiny", shard_size=4)
    request = encode_request(
        "imagenet", "train", None, settings, batch_size=4, num_workers=0, limit=None, device="cpu"
    )
    commits, logs = [], []
    summary = run_encode_request(request, volume, commit=lambda: commits.append(len(logs)), log=logs.append)
    assert summary["items"] == 6 and len(commits) == 3  # two shards, then the finished files
    latents = np.load(volume / "data" / "imagenet-latents" / "train_latents.npy")
    assert latents.shape == (6, 4, 8, 8)
    assert "shard 1 written and committed" in logs
