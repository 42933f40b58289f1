"""Checkpoint files: atomic, weights_only-loadable, prefix-free, and clear errors when broken."""

import os
import time

import pytest
import torch
from torch import nn

from zoo.checkpoints import (
    CheckpointError,
    checksum_path,
    clean_state_dict,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)
from zoo.runs import RunDir, RunError, check_run


def test_round_trip_with_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    payload = {
        "run_name": "a",
        "step": 5,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "config": {"seed": 1},
    }
    save_checkpoint(tmp_path / "c.pt", payload)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 5 and loaded["run_name"] == "a"
    assert torch.equal(loaded["model"]["weight"], model.weight)
    assert loaded["versions"]["torch"] == torch.__version__
    again = torch.optim.Adam(model.parameters())
    again.load_state_dict(loaded["optimizer"])
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "good.pt", {"step": 1, "model": {"w": torch.ones(1000)}})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a zoo checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_compiled_and_ddp_prefixes_are_removed():
    state = {
        "_orig_mod.net.0.weight": torch.ones(1),
        "module._orig_mod.head.bias": torch.zeros(1),
        "plain": torch.ones(1),
    }
    assert set(clean_state_dict(state)) == {"net.0.weight", "head.bias", "plain"}
    model = nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model


def test_run_folder_rules(tmp_path):
    run = check_run(tmp_path, "r1", resume=False)
    assert not run.root.exists(), "checking a run writes nothing"
    run.root.mkdir()
    (run.root / "config.toml").write_text("x")
    # Stopped before its first checkpoint: restartable with one flag, not by hand.
    with pytest.raises(RunError, match="holds no checkpoint.*pass --restart"):
        check_run(tmp_path, "r1", resume=False)
    with pytest.raises(RunError, match="cannot resume run 'r1'.*afresh with --restart"):
        check_run(tmp_path, "r1", resume=True)
    assert check_run(tmp_path, "r1", resume=False, restart=True) == run
    save_checkpoint(run.last, {"step": 1})
    with pytest.raises(RunError, match="already exists.*--resume"):
        check_run(tmp_path, "r1", resume=False)
    with pytest.raises(RunError, match="--restart starts afresh only a run without checkpoints.*last.pt"):
        check_run(tmp_path, "r1", resume=False, restart=True)
    with pytest.raises(RunError, match="cannot resume run 'other'"):
        check_run(tmp_path, "other", resume=True)


def test_heartbeat_and_metrics_tolerate_partial_lines(tmp_path):
    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    beat = run.write_heartbeat(status="running", step=3)
    assert beat["run_name"] == "r" and beat["step"] == 3 and beat["updated"] >= beat["started"]
    with pytest.raises(ValueError):
        run.write_heartbeat(status="bogus")
    run.append_metrics({"step": 1, "train/loss": 0.5})
    with open(run.metrics, "a") as handle:
        handle.write('{"step": 2, "train/lo')  # a writer caught mid-line
    assert run.read_metrics() == [{"step": 1, "train/loss": 0.5}]


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def tensor_offset(data: bytes, tensor: torch.Tensor) -> int:
    """Where `tensor`'s bytes sit in a saved file (torch stores them uncompressed)."""
    offset = data.find(tensor.numpy().tobytes())
    assert offset > 0
    return offset + 5


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 3, "model": {"w": weights}})
    flip_byte(path, tensor_offset(path.read_bytes(), weights))
    # The flip is in the weights' bytes: torch itself loads the file without a word (the test's
    # premise), with one weight silently changed.
    silent = torch.load(path, weights_only=True)
    assert not torch.equal(silent["model"]["w"], weights)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path} does not match its checksum") and "last.pt.sha256" in message
    assert "damaged" in message and "step_*.pt" in message and "\n" not in message
    # Without its sidecar the zip archive's own CRC-32 of the record catches it.
    checksum_path(path).unlink()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path} is damaged (its record") and "fails its CRC check" in message
    assert "step_*.pt" in message and "\n" not in message


def test_intact_file_with_sidecar_loads_and_a_bad_sidecar_is_named(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 7, "model": {"w": torch.ones(10)}})
    assert load_checkpoint(path)["step"] == 7
    checksum_path(path).write_text("not a digest\n")
    with pytest.raises(CheckpointError, match=r"c\.pt\.sha256 is not a sha256 checksum file"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [100, 0.5, -10])
def test_truncated_file_is_one_clean_sentence(tmp_path, keep):
    path = tmp_path / "cut.pt"
    save_checkpoint(tmp_path / "good.pt", {"step": 1, "model": {"w": torch.ones(1000)}})
    data = (tmp_path / "good.pt").read_bytes()
    end = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:end])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path} is truncated or damaged") and f"{len(data[:end])} bytes" in message
    assert "miniz" not in message and "\n" not in message and len(message) < 300
    # The same file with a sidecar (as zoo writes it) is caught earlier, by its checksum.
    checksum_path(path).write_text(checksum_path(tmp_path / "good.pt").read_text())
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(path)


def test_a_file_that_is_no_archive_is_named(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a checkpoint \(a torch\.save zip archive"):
        load_checkpoint(path)


def test_a_sidecar_older_than_its_file_is_the_previous_files(tmp_path):
    """A save stopped between renaming the new file into place and writing its sidecar leaves the
    previous sidecar beside the new file: the file loads at once, judged by its zip CRCs."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 10, "model": {"w": torch.ones(10)}})
    previous_sidecar = checksum_path(path).read_text()
    save_checkpoint(path, {"step": 20, "model": {"w": torch.zeros(10)}})
    checksum_path(path).write_text(previous_sidecar)
    later = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(later, later))
    started = time.monotonic()
    assert load_checkpoint(path)["step"] == 20
    assert time.monotonic() - started < 5
    # The same stale sidecar beside a damaged file: refused, by the CRC.
    weights = torch.arange(1000, dtype=torch.float32)
    save_checkpoint(path, {"step": 30, "model": {"w": weights}})
    checksum_path(path).write_text(previous_sidecar)
    flip_byte(path, tensor_offset(path.read_bytes(), weights))
    os.utime(path, ns=(later + 1, later + 1))
    with pytest.raises(CheckpointError, match="does not match its checksum.*damaged"):
        load_checkpoint(path)
