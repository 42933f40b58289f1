"""`loss.jvp = auto`: the calibration picks a valid mode, leaves the run untouched, is cached
per device / model / batch size / precision, respects the memory limit and a resumed run's mode."""

import json
import math

import pytest
import torch
from torch import Tensor, nn

from zoo.bench.calibration import (
    cache_path,
    calibrate,
    calibration_key,
    candidate_modes,
    choose_jvp_mode,
    offers_fused,
    resolve_for_training,
    time_candidates,
)
from zoo.config.loading import load_config
from zoo.config.schema import LossConfig, MLPConfig, OptimConfig
from zoo.models import build_model
from zoo.models.base import FlowModel

CPU = torch.device("cpu")


class CountingMLP(FlowModel):
    """A small MLP that counts forward calls in a class attribute, shared by its deep copies."""

    calls = 0

    def __init__(self, hidden: int = 32) -> None:
        super().__init__((2,), 0)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Dropout(0.1), nn.Linear(hidden, 2))

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        CountingMLP.calls += 1
        return self.net(torch.cat([z, t[:, None], (t - r)[:, None]], dim=1))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_calibration_picks_a_candidate_and_leaves_model_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model = CountingMLP()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    mode = choose_jvp_mode(model, LossConfig(ratio=0.5), (16, 2), CPU, "fp32")
    assert mode in candidate_modes(CPU, fused=False) and mode not in ("nograd", "cuda_graph", "compile")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_second_call_reads_the_cache_without_timing_anything(cache_dir) -> None:
    model = CountingMLP()
    first = calibrate(model, LossConfig(), 16, CPU, "fp32")
    calls_after_first = CountingMLP.calls
    assert calls_after_first > 0
    second = calibrate(model, LossConfig(), 16, CPU, "fp32")
    assert CountingMLP.calls == calls_after_first  # no step ran
    assert second.mode == first.mode and second.medians_s == first.medians_s
    assert "cached" in second.reason
    stored = json.loads((cache_dir / "jvp_modes.json").read_text())
    assert cache_path() == cache_dir / "jvp_modes.json" and len(stored) == 1
    (entry,) = stored.values()
    assert entry["mode"] == first.mode and set(entry["medians_s"]) == set(candidate_modes(CPU, fused=False))
    assert all(math.isfinite(s) and s > 0 for s in entry["medians_s"].values())


def test_cache_keys_differ_by_batch_size_precision_model_and_ratio() -> None:
    model = CountingMLP()
    key = calibration_key(model, LossConfig(), 16, CPU, "fp32", candidate_modes(CPU, fused=False))
    others = [
        calibration_key(model, LossConfig(), 32, CPU, "fp32", candidate_modes(CPU, fused=False)),
        calibration_key(model, LossConfig(), 16, CPU, "bf16", candidate_modes(CPU, fused=False)),
        calibration_key(
            CountingMLP(hidden=64), LossConfig(), 16, CPU, "fp32", candidate_modes(CPU, fused=False)
        ),
        calibration_key(model, LossConfig(ratio=0.25), 16, CPU, "fp32", candidate_modes(CPU, fused=False)),
        calibration_key(model, LossConfig(), 16, CPU, "fp32", candidate_modes(CPU)),
    ]
    assert len({key, *others}) == 6
    # Weights do not matter, only the architecture; the configured jvp is what is being chosen.
    assert (
        calibration_key(
            CountingMLP(), LossConfig(jvp="primal"), 16, CPU, "fp32", candidate_modes(CPU, fused=False)
        )
        == key
    )
    # A new batch size is a new calibration.
    calibrate(model, LossConfig(), 16, CPU, "fp32")
    before = CountingMLP.calls
    calibrate(model, LossConfig(), 8, CPU, "fp32")
    assert CountingMLP.calls > before


def test_candidates_that_do_not_fit_are_never_chosen() -> None:
    model = CountingMLP(hidden=256)
    free = calibrate(model, LossConfig(ratio=1.0), 256, CPU, "fp32", use_cache=False)
    peaks = free.peak_bytes
    leanest = min(peaks, key=peaks.get)
    greedy = max(peaks, key=peaks.get)
    assert peaks[greedy] > peaks[leanest]
    limit_gb = (peaks[leanest] + peaks[greedy]) / 2 / 2**30
    capped = calibrate(
        model, LossConfig(ratio=1.0), 256, CPU, "fp32", memory_limit_gb=limit_gb, use_cache=False
    )
    assert capped.peak_bytes[capped.mode] <= limit_gb * 2**30
    assert greedy not in capped.medians_s and "over the memory limit" in capped.reason
    nothing = calibrate(model, LossConfig(ratio=1.0), 256, CPU, "fp32", memory_limit_gb=1e-6, use_cache=False)
    assert nothing.mode == leanest and "no candidate fits" in nothing.reason and nothing.medians_s == {}


def test_resolve_for_training_keeps_stored_and_explicit_modes_and_calibrates_auto() -> None:
    model = CountingMLP()
    cfg = load_config("moons", ["train.batch_size=16"])
    assert cfg.loss.jvp == "auto"
    before = CountingMLP.calls
    assert resolve_for_training(cfg, model, CPU, 16, stored_mode="selective")[0] == "selective"
    explicit = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"jvp": "nograd"})})
    assert resolve_for_training(explicit, model, CPU, 16) == ("nograd", "set by loss.jvp")
    fm = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"kind": "flow_matching"})})
    assert "no JVP" in resolve_for_training(fm, model, CPU, 16)[1]
    assert CountingMLP.calls == before  # none of these timed anything
    mode, reason = resolve_for_training(cfg, model, CPU, 16)
    assert mode in candidate_modes(CPU, fused=False) and reason.startswith("auto: fastest step of")
    assert CountingMLP.calls > before


def test_choose_jvp_mode_checks_the_batch_shape() -> None:
    with pytest.raises(ValueError, match="does not match the model's data shape"):
        choose_jvp_mode(CountingMLP(), LossConfig(), (16, 3), CPU, "fp32")


def test_fused_is_offered_for_zoo_models_and_under_autocast_only_with_a_bf16_jvp() -> None:
    zoo_mlp = build_model(MLPConfig(hidden=16, depth=1, time_embed_dim=8), (2,), 0)
    assert offers_fused(zoo_mlp, LossConfig(), "fp32")
    assert not offers_fused(zoo_mlp, LossConfig(), "bf16")  # tangent at bf16 activations
    assert offers_fused(zoo_mlp, LossConfig(jvp_precision="bf16"), "bf16")
    assert not offers_fused(CountingMLP(), LossConfig(), "fp32")  # no row tangents
    calibration = calibrate(zoo_mlp, LossConfig(), 32, CPU, "fp32", use_cache=False)
    assert "fused" in calibration.medians_s


def test_peaks_do_not_depend_on_which_candidate_is_measured_first() -> None:
    """Adam's moments exist before the first candidate's peak is taken (one untimed step)."""
    model = CountingMLP(hidden=256)
    orders = (["primal", "selective"], ["selective", "primal"])
    peaks = [
        time_candidates(model, LossConfig(ratio=0.5), 64, CPU, "fp32", OptimConfig(), order, None).peak_bytes
        for order in orders
    ]
    assert peaks[0] == peaks[1]


def bf16_losses(modes: list[str], jvp_precision: str = "tf32") -> dict[str, float]:
    """The MeanFlow loss of one fixed batch and draw under each mode, under bf16 autocast on the
    CPU (and "fp32": full_batch without autocast)."""
    from zoo.losses import build_loss

    model = build_model(MLPConfig(hidden=64, depth=2, time_embed_dim=16), (2,), 0).eval()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    losses = {}
    for mode in [*modes, "fp32"]:
        loss_fn = build_loss(
            LossConfig(jvp="full_batch" if mode == "fp32" else mode, jvp_precision=jvp_precision, ratio=0.5)
        )
        draws = loss_fn.draw(model, x, None, torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            losses[mode] = float(loss_fn.evaluate(model, x, draws)[0].detach())
    return losses


def test_full_batch_under_bf16_is_fp32_so_auto_does_not_offer_it() -> None:
    """The audit's finding, as the reason for the rule: under bf16 autocast full_batch's loss is
    bit-identical to fp32's (its prediction comes from the fp32 JVP island); selective's is not."""
    losses = bf16_losses(["full_batch", "primal", "selective"])
    assert losses["full_batch"] == losses["fp32"]
    assert losses["selective"] != losses["fp32"] and losses["primal"] != losses["fp32"]
    assert abs(losses["selective"] - losses["fp32"]) < 0.05 * abs(losses["fp32"])  # bf16-size, not a bug
    assert candidate_modes(CPU, fused=False, precision="bf16", jvp_precision="tf32") == ["selective"]
    assert candidate_modes(CPU, fused=False, precision="fp16", jvp_precision="fp32") == ["selective"]
    # With the JVP itself in bf16, full_batch's prediction is bf16 too: offered again.
    assert bf16_losses(["full_batch"], jvp_precision="bf16")["full_batch"] != losses["fp32"]
    assert candidate_modes(CPU, fused=True, precision="bf16", jvp_precision="bf16") == [
        "fused",
        "primal",
        "full_batch",
        "selective",
    ]
    assert candidate_modes(CPU, fused=False, precision="fp32", jvp_precision="bf16") == ["selective"]
    assert candidate_modes(CPU, fused=False) == ["primal", "full_batch", "selective"]


def test_the_jvp_mode_line_says_what_precision_the_prediction_gets() -> None:
    model = build_model(MLPConfig(hidden=16, depth=1, time_embed_dim=8), (2,), 0)
    cfg = load_config("moons", ["train.batch_size=16", "precision=bf16"])
    mode, reason = resolve_for_training(cfg, model, CPU, 16)
    assert mode == "selective"
    assert (
        "full_batch and primal not offered: they compute the prediction in the JVP's fp32/TF32, not bf16"
        in reason
    )
    explicit = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"jvp": "full_batch"})})
    mode, reason = resolve_for_training(explicit, model, CPU, 16)
    assert mode == "full_batch" and reason.startswith(
        "set by loss.jvp; note: full_batch computes the prediction"
    )
    assert "precision bf16 changes almost nothing" in reason and "loss.jvp=selective" in reason
    assert "loss.jvp_precision=bf16" in reason
    resumed = resolve_for_training(cfg, model, CPU, 16, stored_mode="primal")[1]
    assert "kept from the checkpoint" in resumed and "applies to the other rows only" in resumed
    fp32 = load_config("moons", ["train.batch_size=16"])
    assert (
        "note" not in resolve_for_training(fp32.model_copy(update={"loss": explicit.loss}), model, CPU, 16)[1]
    )


def test_train_prints_the_cache_and_the_precision_note(tmp_path, monkeypatch, cache_dir) -> None:
    """Through `zoo train`'s own output (rich markup): the cached choice names the cache file."""
    from tiny_runs import TINY_RUN
    from typer.testing import CliRunner

    from zoo_cli.main import app

    monkeypatch.chdir(tmp_path)
    common = [
        *TINY_RUN,
        "loss.jvp=auto",
        "--precision",
        "bf16",
        "--steps",
        "2",
        "--threads",
        "1",
        "tracking.enabled=false",
        "eval.n_samples=50",
        "eval.batch_size=50",
    ]
    outputs = []
    for name in ("first", "second"):
        result = CliRunner().invoke(app, ["train", "moons", *common, "--run-name", name])
        assert result.exit_code == 0, result.output
        outputs.append("".join(result.output.split()))  # rich wraps lines, even inside the path

    def squeezed(text: str) -> str:
        return "".join(text.split())

    assert squeezed("JVP mode: selective (auto: fastest step of selective") in outputs[0]
    assert "cached" not in outputs[0]
    assert squeezed("; cached ") in outputs[1] and squeezed(f"in {cache_path()}") in outputs[1]
    assert squeezed("not offered: they compute the prediction in the JVP's fp32/TF32, not bf16") in outputs[1]
