"""Checkpoint files: atomic, weights_only-loadable, prefix-free, and clear errors when broken."""

import pytest
import torch
from torch import nn

from zoo.checkpoints import CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint, unwrap
from zoo.runs import RunDir, RunError, check_run


def test_round_trip_with_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    payload = {"run_name": "a", "step": 5, "model": model.state_dict(), "optimizer": opt.state_dict(),
               "rng": {"torch": torch.get_rng_state()}, "config": {"seed": 1}}
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
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a zoo checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_compiled_and_ddp_prefixes_are_removed():
    state = {"_orig_mod.net.0.weight": torch.ones(1), "module._orig_mod.head.bias": torch.zeros(1), "plain": torch.ones(1)}
    assert set(clean_state_dict(state)) == {"net.0.weight", "head.bias", "plain"}
    model = nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model


def test_run_folder_rules(tmp_path):
    run = check_run(tmp_path, "r1", resume=False)
    assert not run.root.exists(), "checking a run writes nothing"
    run.root.mkdir()
    (run.root / "config.toml").write_text("x")
    with pytest.raises(RunError, match="already exists.*--resume"):
        check_run(tmp_path, "r1", resume=False)
    with pytest.raises(RunError, match="cannot resume run 'r1'"):
        check_run(tmp_path, "r1", resume=True)
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
