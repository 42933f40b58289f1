"""No silent out-of-memory, on a CPU with an artificial memory cap:
the probe splits a batch that does not fit into micro-batches that do, or fails at once naming
the largest batch that fits; accumulated micro-batch gradients equal the whole batch's."""

import copy
import json
import re
import time
from typing import Any

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from zoo.config.loading import load_config
from zoo.config.schema import LossConfig, MLPConfig
from zoo.data.base import BatchSource
from zoo.losses import MeanFlowLoss
from zoo.losses.time_sampling import TimePair
from zoo.models import build_model
from zoo.runs import RunError
from zoo.training import trainer
from zoo.training.ema import EMA
from zoo.training.memory import (
    LiveTensorMeter,
    Measurement,
    MemoryLimitError,
    MemoryMeter,
    plan_micro_batches,
)
from zoo_cli.main import app

CPU = torch.device("cpu")
BATCH = 256
SMALL_RUN = [
    "model.hidden=32",
    "model.depth=2",
    f"train.batch_size={BATCH}",
    "loss.jvp=nograd",
    "eval.n_samples=100",
    "eval.solver_nfe=[2]",
    "eval.meanflow_steps=[1]",
    "eval.batch_size=100",
    "tracking.enabled=false",
]


def small_state() -> trainer.TrainState:
    cfg = load_config("moons", [*SMALL_RUN, "device=cpu", "run_name=probe"])
    return trainer.build_state(cfg, CPU)


def probe_peaks(state: trainer.TrainState, sizes: list[int]) -> dict[int, int]:
    meter = LiveTensorMeter(state.model, None)
    return {
        size: meter.measure(lambda size=size: trainer.probe_step(state, size)).peak_bytes for size in sizes
    }


def cap_between(low: int, high: int) -> int:
    """A memory limit that `low` bytes fit under and `high` bytes do not."""
    assert low < high, (low, high)
    return (low + high) // 2


def test_probe_peaks_grow_with_the_batch_and_are_repeatable() -> None:
    state = small_state()
    first = probe_peaks(state, [32, 64, 128, 256])
    again = probe_peaks(state, [256, 128, 64, 32])
    assert first == again  # the probe restores every RNG: same draws, same allocations
    assert first[32] < first[64] < first[128] < first[256]


def test_a_batch_over_the_cap_is_split_into_micro_batches_that_fit_with_the_same_effective_batch() -> None:
    state = small_state()
    peaks = probe_peaks(state, [64, 128])
    meter = LiveTensorMeter(state.model, cap_between(peaks[64], peaks[128]))
    plan = plan_micro_batches(lambda size: trainer.probe_step(state, size), meter, BATCH, 1, allow_split=True)
    assert plan.micro_batches == 4 and plan.micro_batch_size == 64
    assert plan.micro_batches * plan.micro_batch_size == BATCH
    assert plan.peak_bytes == peaks[64] <= meter.limit_bytes
    assert "split into 4 micro-batches of 64" in plan.describe(BATCH)
    # The run's randomness and data position are untouched by all that probing.
    generator_state = state.generator.get_state()
    torch_state = torch.get_rng_state()
    trainer.probe_step(state, 64)
    assert torch.equal(state.generator.get_state(), generator_state) and torch.equal(
        torch.get_rng_state(), torch_state
    )


def test_without_auto_microbatch_it_fails_at_once_naming_the_largest_batch_that_really_fits() -> None:
    state = small_state()
    peaks = probe_peaks(state, [64, 128])
    meter = LiveTensorMeter(state.model, cap_between(peaks[64], peaks[128]))
    probe = lambda size: trainer.probe_step(state, size)  # noqa: E731
    with pytest.raises(MemoryLimitError, match="largest batch that fits is") as caught:
        plan_micro_batches(probe, meter, BATCH, 1, allow_split=False)
    assert isinstance(caught.value, RunError)  # the CLI turns it into one line and exit code 1
    largest = int(re.search(r"largest batch that fits is (\d+)", str(caught.value)).group(1))
    assert f"train.batch_size={largest}" in str(caught.value)
    assert 64 <= largest < 128
    assert meter.measure(lambda: probe(largest)).fits
    assert not meter.measure(lambda: probe(largest + 1)).fits


def test_with_configured_accumulation_the_message_names_the_micro_batch_and_the_total() -> None:
    state = small_state()
    peaks = probe_peaks(state, [32, 64])
    meter = LiveTensorMeter(state.model, cap_between(peaks[32], peaks[64]))
    with pytest.raises(MemoryLimitError) as caught:
        plan_micro_batches(lambda size: trainer.probe_step(state, size), meter, BATCH, 4, allow_split=False)
    largest = int(re.search(r"largest batch that fits is (\d+) per micro-batch", str(caught.value)).group(1))
    assert 32 <= largest < 64
    assert f"train.batch_size={largest * 4} (with grad_accum=4)" in str(caught.value)


def test_when_not_even_one_sample_fits_the_error_says_so() -> None:
    state = small_state()
    meter = LiveTensorMeter(state.model, 1000)  # below the parameters alone
    with pytest.raises(MemoryLimitError, match="not even a micro-batch of 1 fits"):
        plan_micro_batches(lambda size: trainer.probe_step(state, size), meter, 8, 1, allow_split=True)
    with pytest.raises(MemoryLimitError, match="not even a batch of 1 fits"):
        plan_micro_batches(lambda size: trainer.probe_step(state, size), meter, 8, 1, allow_split=False)


# --- accumulation is exact -------------------------------------------------------------------


class FixedBatches(BatchSource):
    """Serves consecutive slices of one fixed batch, so micro-batches partition it exactly."""

    name = "fixed"
    is_image = False
    num_classes = 0
    class_names: list[str] = []
    num_train = None

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.data_shape = tuple(x.shape[1:])
        self.device = x.device
        self.batch_size = x.shape[0]
        self.position = 0

    def next_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        rows = self.x[self.position : self.position + self.batch_size]
        self.position = (self.position + self.batch_size) % self.x.shape[0]
        return rows, None

    def held_out_labeled(self, n: int) -> tuple[Tensor, Tensor | None]:
        return self.x[:n], None

    def reference(self, n: int) -> Tensor:
        return self.x[:n]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class PerSampleDraws:
    """Noise and (t, r) as fixed functions of each sample, so a sample gets the same draws
    whichever micro-batch it lands in (the generator's stream would differ per split)."""

    def noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        self.x = x  # the loss draws noise first, then times: remember whose times to give
        return torch.sin(5.0 * x + 1.0) + torch.cos(3.0 * x.flip(1))

    def times(self, batch: int, cfg: LossConfig, generator: torch.Generator, dtype: torch.dtype) -> TimePair:
        a, b = torch.sigmoid(3.0 * self.x[:, 0]), torch.sigmoid(2.0 * self.x[:, 1] - 0.5)
        mask = self.x[:, 0] + self.x[:, 1] > 0.0  # about half the samples get r != t
        t, r = torch.maximum(a, b), torch.where(mask, torch.minimum(a, b), torch.maximum(a, b))
        index = torch.arange(batch)
        return TimePair(t=t, r=r, mask=mask, jvp_index=index[mask], flow_index=index[~mask])


def one_step_update(model, x: Tensor, micro_batches: int, cfg) -> list[Tensor]:
    """The trainer's train_step with plain SGD: parameter change / lr = the accumulated gradient."""
    model = copy.deepcopy(model)
    state = trainer.TrainState(
        cfg=cfg,
        device=CPU,
        source=FixedBatches(x),
        model=model,
        ema=EMA(model, 0.9),
        loss_fn=MeanFlowLoss(cfg.loss),
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        generator=torch.Generator().manual_seed(0),
        micro_batches=micro_batches,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train_step(state)
    lr = state.optimizer.param_groups[0]["lr"]
    return [(b - p.detach()) / lr for b, p in zip(before, model.parameters(), strict=True)]


@pytest.mark.parametrize("mode", ["nograd", "primal"])
def test_accumulated_micro_batch_gradients_equal_the_whole_batch_gradient(mode, monkeypatch) -> None:
    draws = PerSampleDraws()
    monkeypatch.setattr("zoo.losses.meanflow.draw_noise", draws.noise)
    monkeypatch.setattr("zoo.losses.meanflow.sample_t_r", draws.times)
    cfg = load_config(
        "moons",
        [
            "model.hidden=32",
            "model.depth=2",
            "train.batch_size=48",
            "optim.grad_clip=0",
            "optim.warmup_steps=0",
            f"loss.jvp={mode}",
            "loss.weight_p=0.75",
        ],
    )
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=32, depth=2), (2,)).double()
    x = torch.randn(48, 2, dtype=torch.float64)
    whole = one_step_update(model, x, 1, cfg)
    for micro_batches in (2, 3, 4):
        split = one_step_update(model, x, micro_batches, cfg)
        for g_whole, g_split in zip(whole, split, strict=True):
            torch.testing.assert_close(g_split, g_whole, rtol=1e-10, atol=1e-12)
    assert any(g.abs().max() > 0 for g in whole)


# --- end to end through `zoo train` --------------------------------------------------------


def cli_cap_gb() -> float:
    """A cap that a micro-batch of 64 fits under and one of 128 does not, for the SMALL_RUN model."""
    state = small_state()
    peaks = probe_peaks(state, [64, 128])
    return cap_between(peaks[64], peaks[128]) / 2**30


def test_zoo_train_splits_the_batch_under_a_tiny_cap_and_records_it(tmp_path, monkeypatch) -> None:
    cap = cli_cap_gb()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "moons",
            *SMALL_RUN,
            f"train.memory_limit_gb={cap!r}",
            "--device",
            "cpu",
            "--steps",
            "6",
            "--run-name",
            "capped",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "split into 4 micro-batches of 64" in result.output
    heartbeat = json.loads((tmp_path / "outputs" / "capped" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "finished" and heartbeat["step"] == 6
    assert heartbeat["micro_batches"] == 4


def test_zoo_train_without_auto_microbatch_exits_quickly_naming_the_largest_batch(
    tmp_path, monkeypatch
) -> None:
    cap = cli_cap_gb()
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    result = CliRunner().invoke(
        app,
        [
            "train",
            "moons",
            *SMALL_RUN,
            f"train.memory_limit_gb={cap!r}",
            "train.auto_microbatch=false",
            "--device",
            "cpu",
            "--steps",
            "6",
            "--run-name",
            "refused",
        ],
    )
    assert result.exit_code != 0
    assert "largest batch that fits is" in result.output, result.output
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "outputs" / "refused").exists()


class SizeMeter(MemoryMeter):
    """A stand-in for memory: a micro-batch of at most `largest` samples fits, at 1 kB a sample."""

    def __init__(self, largest: int) -> None:
        super().__init__(limit_bytes=largest * 1000)
        self.largest = largest
        self.sizes: list[int] = []  # what the probe was asked to run, in order

    def measure(self, step) -> Measurement:
        step()
        return Measurement(self.sizes[-1] <= self.largest, self.sizes[-1] * 1000)


def test_a_batch_with_few_divisors_is_refused_naming_the_nearest_that_split_well() -> None:
    """65537 is prime: split evenly it needs 65537 micro-batches of 1 where 1024 fit."""
    meter = SizeMeter(largest=1024)
    with pytest.raises(MemoryLimitError) as caught:
        plan_micro_batches(meter.sizes.append, meter, 65537, 1, allow_split=True)
    message = str(caught.value)
    assert "only into 65537 micro-batches of 1" in message and "micro-batches of 1024 fit" in message
    assert "use train.batch_size=65520 or train.batch_size=65585 (65 micro-batches each)" in message
    assert len(meter.sizes) < 40  # a binary search, not a probe per micro-batch count
    for batch, size in [(65520, 1008), (65585, 1009), (65536, 1024)]:  # the sizes named, and 2**16
        meter = SizeMeter(largest=1024)
        plan = plan_micro_batches(meter.sizes.append, meter, batch, 1, allow_split=True)
        assert (plan.micro_batches, plan.micro_batch_size) == (batch // size, size)


def test_the_refusal_names_the_whole_batch_of_all_processes() -> None:
    meter = SizeMeter(largest=300)
    with pytest.raises(MemoryLimitError) as caught:  # 1018 = 2 x 509 per process, 2 processes
        plan_micro_batches(meter.sizes.append, meter, 1018, 1, allow_split=True, processes=2)
    assert "train.batch_size=2036 splits evenly only into 509 micro-batches of 2 per process" in str(
        caught.value
    )
    assert "use train.batch_size=2032 or train.batch_size=2040 (4 micro-batches each)" in str(caught.value)


def test_a_batch_the_memory_limit_refuses_is_a_usage_error_exit_2():
    """The refusal names a batch size or limit to change: a user error (exit 2), unlike a run
    that fails while training (exit 1)."""
    import typer

    from zoo_cli.errors import user_errors

    with pytest.raises(typer.Exit) as caught, user_errors():
        raise MemoryLimitError("batch 65537 splits only into micro-batches of 1: use 65520 or 65585")
    assert caught.value.exit_code == 2
