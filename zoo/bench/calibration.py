"""`loss.jvp = auto`: time the candidate JVP strategies for a few steps and keep the fastest.

The calibration runs on a throwaway copy of the model and a fresh optimiser, on a synthetic
batch of the run's shape, inside `torch.random.fork_rng`, so the run's weights, optimiser state
and every RNG stream are exactly as they were.  Candidates: fused (zoo's own networks; under
bf16/fp16 autocast only with jvp_precision="bf16", see offers_fused), primal, full_batch (both
only when the JVP island computes at the run's precision, see candidate_modes), selective, plus
cuda_graph on CUDA; nograd (the slow reference) and compile (no gain measured,
long compiles) never.  Under train.compile there is nothing to time: fused is the one mode a
compiled step can run (zoo.training.compiled_step).  A candidate whose peak memory exceeds the
limit is not chosen; if none fits, the one with the smallest peak is, and the trainer's memory
probe then splits the batch.

The choice is cached on disk per (device, model, loss settings, batch size, precision, torch
version) in `$ZOO_CACHE_DIR/jvp_modes.json` (default ~/.cache/zoo), so later runs start at once.
Modes are not bitwise interchangeable in train mode with dropout (zoo.losses.jvp), so a resumed
run must keep its mode: pass the mode stored in the checkpoint as `stored_mode`.
"""

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from zoo.bench.jvp_bench import device_name, measure_peak, memory_limit_bytes
from zoo.bench.steps import graphed_training_step_fn, meanflow_loss, synthetic_batch, training_step_fn
from zoo.bench.timing import interleaved_timings
from zoo.config.schema import LossConfig, OptimConfig, ZooConfigBody
from zoo.devices import synchronize
from zoo.losses import resolve_jvp_mode
from zoo.losses.jvp import PREDICTION_IN_ISLAND, prediction_precision_note
from zoo.models import group_norm_tangent_kernel
from zoo.models.base import FlowModel, RowTangentModel
from zoo.output_paths import zoo_cache_dir
from zoo.runs import atomic_write_json
from zoo.training.memory import format_bytes
from zoo.training.optim import build_optimizer
from zoo.training.step_graph import MODES_NOT_CAPTURABLE

CACHE_FILE = "jvp_modes.json"
CALIBRATION_REPEATS = 3  # timed interleaved rounds per candidate, after the memory pass and one warm-up


def cache_path() -> Path:
    return zoo_cache_dir() / CACHE_FILE


def offers_fused(model: FlowModel, loss_cfg: LossConfig, precision: str) -> bool:
    """fused needs a RowTangentModel; under bf16/fp16 autocast its tangent is taken at
    reduced-precision activations (zoo.losses.jvp.FusedJvp), so there only when the run's
    jvp_precision="bf16" accepts bf16-size error in du/dt anyway."""
    return isinstance(model, RowTangentModel) and (precision == "fp32" or loss_cfg.jvp_precision == "bf16")


def candidate_modes(
    device: torch.device,
    fused: bool = True,
    captured_step: bool = False,
    precision: str = "fp32",
    jvp_precision: str = "tf32",
) -> list[str]:
    """fused: whether to offer the fused mode (see offers_fused); captured_step: the run replays
    its step from a CUDA graph (train.cuda_graph), inside which cuda_graph cannot run.

    full_batch and primal are offered only when the JVP island computes at the run's precision.
    They take the prediction from the JVP's primal output, computed in the island (fp32/TF32 by
    default), so under --precision bf16 they train exactly as fp32 does: the audit found losses
    bit-identical to fp32's.  `auto` chooses the fastest way to compute the loss the user asked
    for; it must not swap bf16 numerics for fp32 ones because those happened to time faster.  A
    user who prefers that trade sets --precision fp32 (auto then times them) or names the mode
    (the "JVP mode:" line then says what it does to the precision, prediction_precision_note).
    """
    modes = ["fused", "primal", "full_batch", "selective"] if fused else ["primal", "full_batch", "selective"]
    modes = [m for m in modes if prediction_precision_note(m, precision, jvp_precision) is None]
    if device.type == "cuda":
        modes.append("cuda_graph")
    return [m for m in modes if not (captured_step and m in MODES_NOT_CAPTURABLE)]


@dataclass(frozen=True)
class Calibration:
    mode: str
    reason: str
    medians_s: dict[str, float]  # candidates that fit
    peak_bytes: dict[str, int | None]  # None: ran out of memory (CUDA)
    created: float
    torch_version: str


def model_fingerprint(model: FlowModel, loss_cfg: LossConfig) -> str:
    """A hash of what decides the cost: the architecture (module tree with its settings, every
    parameter's shape and dtype), the data signature and the loss settings other than `jvp`."""
    described = {
        "modules": repr(model),
        "parameters": [(name, list(p.shape), str(p.dtype)) for name, p in model.named_parameters()],
        "data_shape": list(model.data_shape),
        "num_classes": model.num_classes,
        "loss": loss_cfg.model_dump(mode="json", exclude={"jvp"}),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def calibration_key(
    model: FlowModel,
    loss_cfg: LossConfig,
    batch_size: int,
    device: torch.device,
    precision: str,
    candidates: list[str],
) -> str:
    # The group-norm tangents as resolved here (loss.jvp_kernels=auto: Triton or, where the kernels
    # fail or cannot run, the PyTorch operations): timings taken with one do not stand for the other.
    kernels = group_norm_tangent_kernel.resolve(loss_cfg.jvp_kernels, device)
    return (
        f"{device_name(device)}|model={model_fingerprint(model, loss_cfg)}|batch={batch_size}|{precision}"
        f"|torch={torch.__version__}|candidates={','.join(candidates)}|tangent_kernels={kernels}"
    )


def read_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        # A cache must never stop training: an unreadable file (written by hand, or by an old
        # zoo) is treated as empty and replaced on the next write.
        return {}


def write_cache_entry(path: Path, key: str, calibration: Calibration) -> None:
    entries = read_cache(path)
    entries[key] = asdict(calibration)
    atomic_write_json(path, entries)


def calibrate(
    model: FlowModel,
    loss_cfg: LossConfig,
    batch_size: int,
    device: torch.device,
    precision: str,
    optim_cfg: OptimConfig | None = None,
    memory_limit_gb: float | None = None,
    use_cache: bool = True,
    captured_step: bool = False,
) -> Calibration:
    """The fastest JVP mode for this model, batch and device, from the cache or a fresh timing."""
    device = torch.device(device)
    fused = offers_fused(model, loss_cfg, precision)
    candidates = candidate_modes(device, fused, captured_step, precision, loss_cfg.jvp_precision)
    key = calibration_key(model, loss_cfg, batch_size, device, precision, candidates)
    path = cache_path()
    if use_cache:
        entry = read_cache(path).get(key)
        if entry is not None:
            cached = Calibration(**entry)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(cached.created))
            # No square brackets: the trainer prints the reason as rich markup, which would eat them.
            return Calibration(**{**entry, "reason": f"{cached.reason}; cached {when} in {path}"})
    calibration = time_candidates(
        model,
        loss_cfg,
        batch_size,
        device,
        precision,
        optim_cfg or OptimConfig(),
        candidates,
        memory_limit_gb,
        captured_step,
    )
    if use_cache:
        write_cache_entry(path, key, calibration)
    return calibration


def time_candidates(
    model: FlowModel,
    loss_cfg: LossConfig,
    batch_size: int,
    device: torch.device,
    precision: str,
    optim_cfg: OptimConfig,
    candidates: list[str],
    memory_limit_gb: float | None,
    captured_step: bool = False,
) -> Calibration:
    """A memory pass (one step per candidate, also the first warm-up), one warm-up round, then
    CALIBRATION_REPEATS interleaved timed rounds, on a copy of the model; RNGs restored after.

    captured_step: time the steps replayed from CUDA graphs, as train.cuda_graph will run them
    (replay removes the launch overhead that decides the eager ranking)."""
    limit = memory_limit_bytes(device, memory_limit_gb)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        scratch = copy.deepcopy(model).train()
        optimizer = build_optimizer(scratch, optim_cfg)
        batch = synthetic_batch(scratch, batch_size, device, loss_cfg)
        if captured_step:
            pool = torch.cuda.graph_pool_handle()  # the candidates' graphs never replay at once
            steps = {
                mode: graphed_training_step_fn(
                    scratch,
                    optimizer,
                    meanflow_loss(loss_cfg, mode, loss_cfg.ratio),
                    batch,
                    precision,
                    pool=pool,
                )
                for mode in candidates
            }
        else:
            steps = {
                mode: training_step_fn(
                    scratch, optimizer, meanflow_loss(loss_cfg, mode, loss_cfg.ratio), batch, precision
                )
                for mode in candidates
            }
        # One untimed step first: every candidate's peak then includes Adam's moments.
        measure_peak(next(iter(steps.values())), device, scratch, optimizer)
        peaks = {mode: measure_peak(step, device, scratch, optimizer) for mode, step in steps.items()}
        fitting = {
            mode: step for mode, step in steps.items() if peaks[mode] is not None and peaks[mode] <= limit
        }
        timings = {}
        if fitting:
            timings = interleaved_timings(
                fitting, CALIBRATION_REPEATS, warmup=1, sync=lambda: synchronize(device)
            )
        del scratch, optimizer, batch, steps  # free the copy (GPU memory) before training starts
    medians = {mode: timing.median for mode, timing in timings.items()}
    where = f"{device_name(device)}, batch {batch_size}, {precision}, ratio {loss_cfg.ratio:g}"
    if medians:
        mode = min(medians, key=medians.get)
        measured = ", ".join(
            f"{m} {s * 1e3:.1f} ms" for m, s in sorted(medians.items(), key=lambda kv: kv[1])
        )
        left_out = [m for m in candidates if m not in medians]
        reason = f"fastest step of {measured} ({where})"
        if left_out:
            reason += f"; over the memory limit of {format_bytes(limit)}: {', '.join(left_out)}"
    else:
        # Nothing fits at this batch: take the leanest mode; the memory probe will split the batch.
        known = {m: p for m, p in peaks.items() if p is not None}
        mode = min(known, key=known.get) if known else "selective"
        reason = (
            f"no candidate fits in {format_bytes(limit)} at {where}; chose {mode}, the one using the "
            "least memory, and the memory probe will split the batch"
        )
    return Calibration(
        mode=mode,
        reason=reason,
        medians_s=medians,
        peak_bytes=peaks,
        created=time.time(),
        torch_version=torch.__version__,
    )


def choose_jvp_mode(
    model: FlowModel, loss_cfg: LossConfig, batch_shape: tuple[int, ...], device: torch.device, precision: str
) -> str:
    """The calibrated (or cached) fastest JVP mode for batches of `batch_shape` = (B, *data_shape)."""
    if tuple(batch_shape[1:]) != tuple(model.data_shape):
        raise ValueError(
            f"batch shape {tuple(batch_shape)} does not match the model's data shape {model.data_shape}"
        )
    return calibrate(model, loss_cfg, batch_shape[0], torch.device(device), precision).mode


def resolve_for_training(
    cfg: ZooConfigBody,
    model: FlowModel,
    device: torch.device,
    batch_size: int,
    stored_mode: str | None = None,
) -> tuple[str, str]:
    """(concrete JVP mode, why) for a run; `batch_size` is the micro-batch one forward sees.

    A resumed run passes the mode its checkpoint recorded (`stored_mode`) and keeps it, so the
    run continues with the same strategy (and dropout-mask behaviour) it started with.
    """
    mode, reason = decide_mode(cfg, model, device, batch_size, stored_mode)
    note = prediction_precision_note(mode, cfg.precision, cfg.loss.jvp_precision)
    if note is None or cfg.loss.kind != "meanflow":
        return mode, reason
    return mode, f"{reason}; {note}"


def decide_mode(
    cfg: ZooConfigBody, model: FlowModel, device: torch.device, batch_size: int, stored_mode: str | None
) -> tuple[str, str]:
    """resolve_for_training's choice and its reason, before the note on precision."""
    if stored_mode is not None:
        return stored_mode, "kept from the checkpoint (a resumed run keeps its JVP mode)"
    if cfg.loss.jvp != "auto":
        return cfg.loss.jvp, "set by loss.jvp"
    if cfg.loss.kind != "meanflow":
        return resolve_jvp_mode(cfg.loss, device), "flow matching computes no JVP; the setting is unused"
    if cfg.train.compile:
        if not isinstance(model, RowTangentModel):
            raise ValueError(
                f"train.compile needs loss.jvp=fused, which {type(model).__name__} does not support; "
                "set train.compile=false"
            )
        reason = "train.compile: the JVP torch.compile can trace (zoo.training.compiled_step)"
        if cfg.precision != "fp32" and cfg.loss.jvp_precision != "bf16":
            reason += f"; under {cfg.precision} its tangent is taken at {cfg.precision} activations"
        return "fused", reason
    calibration = calibrate(
        model,
        cfg.loss,
        batch_size,
        torch.device(device),
        cfg.precision,
        optim_cfg=cfg.optim,
        memory_limit_gb=cfg.train.memory_limit_gb,
        captured_step=cfg.train.cuda_graph,
    )
    reason = f"auto: {calibration.reason}"
    left_out = [
        m for m in PREDICTION_IN_ISLAND if prediction_precision_note(m, cfg.precision, cfg.loss.jvp_precision)
    ]
    if left_out:
        island = "bf16" if cfg.loss.jvp_precision == "bf16" else "fp32/TF32"
        reason += (
            f"; {' and '.join(left_out)} not offered: they compute the prediction in the JVP's {island}, "
            f"not {cfg.precision}"
        )
    return calibration.mode, reason
