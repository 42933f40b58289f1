"""zoo.training.jvp_plan: which JVP mode a run uses and which settings run together.

Every refusal says what to change; a resumed run keeps its mode, so its refusals name the one fix
open to it; the tip for a CUDA run with eager steps names only options its own rules accept; an old
run trained with a benchmark mode resumes with it.
"""

import re
import shlex

import pytest
import torch
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.bench import jvp_bench
from zoo.bench.jvp_bench import BenchError, BenchSettings
from zoo.checkpoints import load_checkpoint, save_checkpoint
from zoo.config.loading import ConfigError, load_config
from zoo.training.jvp_plan import (
    BENCH_MODES,
    TRAINING_MODES,
    check_capture,
    check_compile,
    check_mode_device,
    faster_step_tip,
    plan_run,
)
from zoo_cli.main import app

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA: only named, nothing runs on it


def test_the_modes_split_into_training_and_benchmark_modes() -> None:
    assert TRAINING_MODES == ("fused", "nograd")
    assert set(BENCH_MODES) == {"primal", "full_batch", "selective", "compile", "cuda_graph"}


def test_a_new_run_trains_fused_or_nograd_and_auto_is_fused() -> None:
    assert plan_run(load_config("moons", ["loss.jvp=auto"]), CPU).mode == "fused"
    explicit = plan_run(load_config("moons", ["loss.jvp=nograd"]), CPU)
    assert (explicit.mode, explicit.reason) == ("nograd", "set by loss.jvp")
    default = plan_run(load_config("moons", []), CPU)
    assert (default.mode, default.reason) == ("fused", "loss.jvp's default")


@pytest.mark.parametrize("mode", ["primal", "full_batch", "selective", "compile", "cuda_graph"])
def test_a_benchmark_mode_is_refused_for_a_new_run_naming_the_training_modes(mode) -> None:
    with pytest.raises(
        ConfigError, match=rf"zoo bench-jvp --modes {mode}.*loss\.jvp=fused.*loss\.jvp=nograd"
    ):
        plan_run(load_config("moons", [f"loss.jvp={mode}"]), CPU)


def test_a_resumed_run_keeps_the_mode_its_checkpoint_records() -> None:
    cfg = load_config("moons", ["loss.jvp=selective"])
    plan = plan_run(cfg, CPU, kept_mode="selective")
    assert plan.mode == "selective" and "kept from the checkpoint" in plan.reason
    assert plan_run(load_config("moons", []), CPU, kept_mode="auto").mode == "fused"


def test_a_resumed_run_whose_mode_needs_cuda_is_told_to_resume_on_cuda() -> None:
    # Its JVP mode is fixed by the checkpoint, so "use loss.jvp=fused" would be no fix.
    with pytest.raises(ConfigError, match=r"loss\.jvp='cuda_graph'.*resume it on a CUDA device"):
        plan_run(load_config("moons", []), CPU, kept_mode="cuda_graph")
    with pytest.raises(ConfigError, match=r"use loss\.jvp=fused"):
        check_mode_device("cuda_graph", CPU)
    check_mode_device("cuda_graph", CUDA)


def test_flow_matching_ignores_the_jvp_setting() -> None:
    plan = plan_run(load_config("moons", ["loss.kind=flow_matching", "loss.jvp=selective"]), CPU)
    assert not plan.meanflow and "unused" in plan.reason


def test_the_fused_mode_line_says_what_autocast_does_to_its_tangent() -> None:
    bf16 = plan_run(load_config("moons", ["precision=bf16"]), CPU)
    assert "tangent is taken at bf16 activations" in bf16.reason and "loss.jvp=nograd" in bf16.reason
    assert "activations" not in plan_run(load_config("moons", []), CPU).reason
    accepted = plan_run(load_config("moons", ["precision=bf16", "loss.jvp_precision=bf16"]), CPU)
    assert "activations" not in accepted.reason
    assert (
        "activations" not in plan_run(load_config("moons", ["precision=bf16", "loss.jvp=nograd"]), CPU).reason
    )


@pytest.mark.parametrize(
    "device, precision, mode, fix",
    [
        (CPU, "fp32", "fused", "train.cuda_graph=false"),
        (CUDA, "fp16", "fused", "precision=bf16"),
        (CUDA, "bf16", "cuda_graph", "loss.jvp=fused"),
        (CUDA, "fp32", "compile", "loss.jvp=fused"),
    ],
)
def test_settings_a_captured_step_cannot_run_are_refused_with_the_fix(device, precision, mode, fix) -> None:
    with pytest.raises(ConfigError, match=re.escape(fix)):
        check_capture(device, precision, mode)


def test_capturable_settings_pass() -> None:
    for mode in ("fused", "primal", "full_batch", "selective", "nograd", "auto", None):
        check_capture(CUDA, "bf16", mode)


def test_a_resumed_run_whose_mode_cannot_be_captured_is_told_to_resume_without_the_captured_step() -> None:
    # Its JVP mode is fixed by the checkpoint, so "change loss.jvp" would be no fix.
    cfg = load_config("moons", ["train.cuda_graph=true"])
    with pytest.raises(ConfigError, match=r"loss\.jvp='cuda_graph'.*resume it without train\.cuda_graph"):
        plan_run(cfg, CUDA, kept_mode="cuda_graph")
    with pytest.raises(ConfigError, match=r"loss\.jvp=fused"):
        check_capture(CUDA, "bf16", "cuda_graph", resumed=False)


@pytest.mark.parametrize(
    "device, mode, jvp_precision, resumed, fix",
    [
        (CPU, "nograd", "tf32", False, r"Use loss\.jvp=fused"),
        (CPU, "selective", "tf32", True, r"resume it without train\.compile"),
        (CUDA, "fused", "fp32", False, r"loss\.jvp_precision=tf32"),
    ],
)
def test_settings_a_compiled_step_cannot_run_are_refused_with_the_fix(
    device, mode, jvp_precision, resumed, fix
) -> None:
    with pytest.raises(ConfigError, match=fix):
        check_compile(device, "meanflow", mode, jvp_precision, resumed)
    overrides = [f"loss.jvp_precision={jvp_precision}", "train.compile=true"]
    if resumed:
        cfg = load_config("moons", overrides)
        with pytest.raises(ConfigError, match=fix):
            plan_run(cfg, device, kept_mode=mode)
    else:
        with pytest.raises(ConfigError, match=fix):
            plan_run(load_config("moons", [*overrides, f"loss.jvp={mode}"]), device)


def test_settings_a_compiled_step_runs_pass() -> None:
    check_compile(CUDA, "meanflow", "fused", "tf32")
    check_compile(CUDA, "meanflow", "auto", "bf16")
    # Flow matching takes no JVP: its (unused) JVP settings do not matter.
    check_compile(CUDA, "flow_matching", "primal", "fp32")
    assert plan_run(load_config("moons", ["loss.jvp=auto", "train.compile=true"]), CPU).mode == "fused"


def bench_settings_of(tip: str, monkeypatch) -> BenchSettings:
    """The settings `zoo bench-jvp` takes from the command a tip names (checked as the CLI checks them),
    caught before anything is timed."""
    (command,) = re.findall(r"`zoo (bench-jvp [^`]*)`", tip)
    taken = []

    def catch(settings: BenchSettings, log) -> None:
        settings.check()
        taken.append(settings)
        raise BenchError("caught before timing")

    monkeypatch.setattr(jvp_bench, "run_bench", catch)
    result = CliRunner().invoke(app, shlex.split(command))
    assert "caught before timing" in result.output, result.output
    return taken[0]


@pytest.mark.parametrize(
    "device, overrides, mode, resumed, named",
    [
        (CUDA, [], "fused", False, {"train.cuda_graph=true", "train.compile=true"}),
        (CUDA, ["loss.kind=flow_matching"], "fused", False, {"train.cuda_graph=true", "train.compile=true"}),
        (CUDA, ["precision=fp16"], "fused", False, {"train.compile=true"}),  # fp16 cannot be captured
        (CUDA, ["loss.jvp_precision=fp32"], "fused", False, {"train.cuda_graph=true"}),  # compile: TF32 only
        (CUDA, ["precision=fp16", "loss.jvp_precision=fp32"], "fused", False, set()),
        (CUDA, [], "nograd", False, {"train.cuda_graph=true"}),  # compile: fused only
        (CUDA, [], "selective", True, {"train.cuda_graph=true"}),  # a resumed run keeps its mode
        (CUDA, [], "cuda_graph", True, set()),
        (CUDA, ["train.cuda_graph=true"], "fused", False, set()),
        (CUDA, ["train.compile=true"], "fused", False, set()),
        (CPU, [], "fused", False, set()),
    ],
)
def test_a_cuda_run_with_eager_steps_is_pointed_at_the_faster_steps_it_accepts(
    device, overrides, mode, resumed, named, monkeypatch
) -> None:
    cfg = load_config("moons", overrides)
    tip = faster_step_tip(cfg, device, mode, resumed)
    offered = set() if tip is None else set(re.findall(r"train\.\w+=true", tip))
    assert offered == named
    if tip is not None:  # with the benchmark that times them, not figures from another machine
        settings = bench_settings_of(tip, monkeypatch)
        assert (settings.preset, settings.device, settings.modes) == ("moons", "cuda", (mode,))
        assert settings.batch_size == cfg.train.batch_size and settings.ratios == (cfg.loss.ratio,)
        assert settings.precision == ("bf16" if cfg.precision == "fp16" else cfg.precision)
        assert settings.cuda_graph == ("train.cuda_graph=true" in named)
        assert settings.compile == ("train.compile=true" in named)
    # Independently of the expectations above: every option named is accepted by the run's checks.
    for option in offered:
        with_option = load_config("moons", [*overrides, option])
        plan_run(with_option, device, kept_mode=mode if resumed else None)


def test_zoo_train_refuses_a_benchmark_mode_and_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "moons", *TINY_RUN, "loss.jvp=selective", "--run-name", "b"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "loss.jvp='selective'" in text and "loss.jvp=fused" in text and "loss.jvp=nograd" in text
    assert not (tmp_path / "outputs" / "b").exists()


def test_a_run_that_trained_with_a_benchmark_mode_resumes_with_it(tmp_path, monkeypatch) -> None:
    """A checkpoint written when `zoo train` still ran the benchmark modes: its mode is kept."""
    monkeypatch.chdir(tmp_path)
    common = [*TINY_RUN, "--threads", "1", "tracking.enabled=false"]
    first = CliRunner().invoke(app, ["train", "moons", *common, "--steps", "2", "--run-name", "old"])
    assert first.exit_code == 0, first.output
    last = tmp_path / "outputs" / "old" / "last.pt"
    payload = load_checkpoint(last)
    payload["jvp_mode"] = "selective"
    payload["config"]["loss"]["jvp"] = "selective"
    save_checkpoint(last, payload)
    resumed = CliRunner().invoke(
        app, ["train", "moons", "--run-name", "old", "--resume", "--steps", "3", "--threads", "1"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert "JVP mode: selective (kept from the checkpoint" in " ".join(resumed.output.split())
    assert load_checkpoint(last)["jvp_mode"] == "selective"
