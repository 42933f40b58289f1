"""The training loop: one optimiser step = `grad_accum` micro-batches, then clip, step, EMA.

Everything random in a step — batch order, flips, noise, times, dropout — comes from the
run's generator or torch's global RNG, both stored in every checkpoint, so a resumed run
draws exactly what the uninterrupted run would have drawn.
"""

import contextlib
import copy
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from zoo import distributed
from zoo.checkpoints import clean_state_dict, load_checkpoint, save_checkpoint
from zoo.config.loading import ConfigError, check_batch_split, config_to_dict, config_to_toml
from zoo.config.schema import ZooConfigBody
from zoo.data import BatchSource, build_data
from zoo.devices import autocast_dtype, enable_cuda_tf32, resolve_device
from zoo.evaluation import EvalReport, Method, evaluate, feature_net_for, headline_method, wants_features
from zoo.experiment_log import append_run_entry
from zoo.interrupts import StopRequested, StopSignals
from zoo.losses import Loss, build_loss
from zoo.losses.base import metrics_to_floats
from zoo.metrics.features import FeatureNet
from zoo.models import build_model
from zoo.models.base import FlowModel
from zoo.output_paths import check_writable_file
from zoo.runs import (
    CheckpointReplacedError,
    DivergedError,
    RunDir,
    RunError,
    RunInterrupted,
    atomic_write_json,
    atomic_write_text,
    check_checkpoint_owner,
    check_run,
    prepare_run_folder,
)
from zoo.tracking import Tracker, make_tracker
from zoo.training.compiled_step import Evaluate, compile_evaluate, keeps_grads
from zoo.training.ema import EMA
from zoo.training.jvp_plan import JvpPlan, plan_run
from zoo.training.memory import MicroBatchPlan, make_meter, plan_micro_batches
from zoo.training.optim import build_optimizer, learning_rate, set_learning_rate
from zoo.training.progress import PhaseHeartbeat, TrainProgress, step_bar
from zoo.training.spikes import SpikeDetector
from zoo.training.step_graph import GraphedLossBackward
from zoo.training.visuals import save_loss_plot, save_samples

# Keys a resumed run may change: how long it runs, how often it reports, where and how it
# evaluates. Anything else (model, loss, data, optimiser, seed) must match the checkpoint.
RESUMABLE_CHANGES = {
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.archive_every",
    "device",
    "output_dir",
    "tracking",
    "eval",
    "experiment_log",
    "threads",
    "train.cuda_graph",
    "train.compile",
    "train.compile_mode",
    "loss.jvp_kernels",
}
# The device may change only within a type: RNG states of CPU, CUDA and MPS generators differ.

# What a Ctrl-C/SIGTERM during a training step waits for (StopSignals.held), and at the end.
STEP_NOTICE = "stopping after this step — saving a checkpoint"
FINISH_NOTICE = "the run has finished — writing its last records; it stays finished"


@dataclass
class TrainState:
    cfg: ZooConfigBody
    device: torch.device
    source: BatchSource
    model: FlowModel
    ema: EMA
    loss_fn: Loss
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None = None
    jvp_mode: str = "nograd"
    step: int = 0
    micro_batches: int = 1
    step_graph: GraphedLossBackward | None = None  # train.cuda_graph: the captured loss + backward
    compiled_evaluate: Evaluate | None = None  # train.compile: loss_fn.evaluate, compiled
    elapsed_s: float = 0.0  # training time up to `step`, over every session of the run
    checkpoint_step: int | None = None  # the step of last.pt (None: no checkpoint yet)
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's
    # Rank 0's losses since its last logged record (train/loss_avg): in the checkpoint, so that a run
    # resumed between two log steps logs the same average as one that never stopped.
    loss_window: list[float] = field(default_factory=list)
    spikes: SpikeDetector = field(default_factory=SpikeDetector)  # rank 0's loss-spike watch
    # Rank 0, image data: the classifier whose feature space evaluations score samples in.
    feature_net: FeatureNet | None = None

    @property
    def is_meanflow(self) -> bool:
        return self.cfg.loss.average_velocity


def rank_batch_size(cfg: ZooConfigBody) -> int:
    """This process's share of `train.batch_size`, which is the effective batch of one optimiser
    step across all data-parallel processes (so `--gpu H100:8` trains the preset's batch)."""
    world = distributed.world_size()
    check_batch_split(cfg, world)
    return cfg.train.batch_size // world


def build_state(cfg: ZooConfigBody, device: torch.device, jvp: JvpPlan | None = None) -> TrainState:
    """A run's state at step 0; jvp: its JVP plan (default: that of a new run)."""
    jvp = jvp or plan_run(cfg, device)
    torch.manual_seed(cfg.seed)
    # One data seed for every rank: the same fixed training set (data.train_size) and, for the
    # file-backed sources, one shared order of which each rank reads a disjoint share.  Sources
    # that shuffle with the trainer's generator get a different order per rank from it.
    source = build_data(cfg.data, device, cfg.seed, rank_batch_size(cfg) // cfg.train.grad_accum)
    source.shard(distributed.rank(), distributed.world_size())
    num_classes = source.num_classes if cfg.data.class_conditional else 0
    model = build_model(cfg.model, source.data_shape, num_classes).to(device)
    distributed.broadcast_parameters(model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * distributed.rank())
    return TrainState(
        cfg=cfg,
        device=device,
        source=source,
        model=model,
        ema=EMA(model, cfg.train.ema_decay),
        loss_fn=build_loss(cfg.loss.model_copy(update={"jvp": jvp.mode})),
        jvp_mode=jvp.mode,
        optimizer=build_optimizer(model, cfg.optim),
        generator=generator,
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler=torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None,
        micro_batches=cfg.train.grad_accum,
    )


def rng_state(state: TrainState) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "generator": state.generator.get_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    if state.device.type == "mps":
        rng["mps"] = torch.mps.get_rng_state()
    return rng


def checkpoint_payload(state: TrainState, metrics: dict[str, float]) -> dict[str, Any]:
    return {
        "run_name": state.cfg.run_name,
        "step": state.step,
        "model": clean_state_dict(state.model.state_dict()),
        "ema": clean_state_dict(state.ema.state_dict()["model"]),
        "ema_updates": state.ema.updates,
        "optimizer": state.optimizer.state_dict(),
        "rng": rng_state(state),
        "data_state": state.source.state_dict(),
        "micro_batches": state.micro_batches,
        "device_type": state.device.type,
        "jvp_mode": state.jvp_mode,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "data_shape": list(state.model.data_shape),
        "num_classes": state.model.num_classes,
        "config": config_to_dict(state.cfg),
        "metrics": metrics,
        "elapsed_s": state.elapsed_s,
        "loss_window": list(state.loss_window),
        "spikes": state.spikes.state_dict(),
    }


def restore(state: TrainState, payload: dict[str, Any]) -> None:
    if payload["device_type"] != state.device.type:
        raise RunError(
            f"run {state.cfg.run_name!r} was trained on {payload['device_type']} and cannot resume "
            f"exactly on {state.device.type} (their random-number states differ); "
            f"resume with --device {payload['device_type']}"
        )
    state.model.load_state_dict(payload["model"])
    state.ema.model.load_state_dict(payload["ema"])
    state.ema.updates = int(payload["ema_updates"])
    state.optimizer.load_state_dict(payload["optimizer"])
    if distributed.rank() == 0 or state.source.order_shared_across_ranks:
        # Only rank 0's data position is saved.  A shared order continues on every rank from it;
        # otherwise the other ranks start a fresh epoch of their own order (reseeded below)
        # rather than reading rank 0's permutation in lockstep.
        state.source.load_state_dict(payload["data_state"])
    state.step = state.checkpoint_step = int(payload["step"])
    state.metrics = dict(payload["metrics"])
    # Checkpoints written before the elapsed time was stored continue from 0.
    state.elapsed_s = float(payload.get("elapsed_s", 0.0))
    # Checkpoints written before the window was stored start an empty one.
    state.loss_window = [float(loss) for loss in payload.get("loss_window", [])]
    if "spikes" in payload:  # checkpoints written before spikes were watched start a fresh watch
        state.spikes.load_state_dict(payload["spikes"])
    state.micro_batches = int(payload["micro_batches"])
    if state.scaler is not None:
        state.scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng"]["torch"])
    state.generator.set_state(payload["rng"]["generator"])
    if state.device.type == "cuda":
        torch.cuda.set_rng_state(payload["rng"]["cuda"], state.device)
    if state.device.type == "mps":
        torch.mps.set_rng_state(payload["rng"]["mps"])
    if distributed.rank() > 0:
        # Checkpoints hold rank 0's random state. Other ranks must not replay it (they would draw
        # the same batches, noise and dropout as rank 0): they reseed from (seed, rank, step).
        # Resumed multi-process runs are therefore exact on rank 0 only.
        reseed = state.cfg.seed + 1_000_003 * distributed.rank() + state.step
        torch.manual_seed(reseed)
        state.generator.manual_seed(reseed)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, path + "."))
        elif a != b:
            diffs.append(path)
    return diffs


def check_resume_config(stored: dict[str, Any], cfg: ZooConfigBody) -> None:
    changed = config_differences(stored, config_to_dict(cfg))
    blocked = [k for k in changed if k not in RESUMABLE_CHANGES and k.split(".")[0] not in RESUMABLE_CHANGES]
    if blocked:
        raise RunError(
            "cannot resume with a different configuration; changed: "
            + ", ".join(blocked)
            + ". Resume with the run's own settings (only steps, logging, evaluation, device may change)"
        )


def micro_batch_backward(state: TrainState) -> dict[str, torch.Tensor]:
    """Draw the next micro-batch and its randomness, add its loss's gradient (divided by the
    number of micro-batches) into `.grad`, and return its metrics as tensors (no host sync)."""
    x, y = state.source.next_batch(state.generator)
    draws = state.loss_fn.draw(state.model, x, y, state.generator)
    if state.step_graph is not None:
        return state.step_graph(state.model, x, draws, state.micro_batches)
    dtype = autocast_dtype(state.cfg.precision)
    evaluate = state.compiled_evaluate or state.loss_fn.evaluate
    with torch.autocast(state.device.type, dtype=dtype, enabled=dtype is not None):
        loss, metrics = evaluate(state.model, x, draws)
    loss = loss / state.micro_batches
    (state.scaler.scale(loss) if state.scaler is not None else loss).backward()
    return metrics


def probe_step(state: TrainState, micro_size: int) -> None:
    """One forward+backward on a micro-batch of `micro_size`, leaving no trace in the run.

    Every RNG and the data position are restored afterwards, so probing does not change what
    the run draws (resumed and uninterrupted runs stay identical).
    """
    saved = (
        torch.get_rng_state(),
        state.generator.get_state(),
        copy.deepcopy(state.source.state_dict()),
        torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
        state.source.batch_size,
    )
    try:
        state.source.batch_size = micro_size
        graph, state.step_graph = state.step_graph, None  # probe eagerly: capturing is for training
        compiled = state.compiled_evaluate
        if state.device.type != "cuda":
            # Off CUDA the meter is a TorchDispatchMode, under which torch.compile runs the step
            # eagerly anyway, and dynamo may then never compile that code again (the whole run
            # silently eager): probe the eager step, the one the meter would see.
            state.compiled_evaluate = None
        try:
            micro_batch_backward(state)
        finally:
            state.step_graph, state.compiled_evaluate = graph, compiled
    finally:
        state.model.zero_grad(set_to_none=True)
        torch.set_rng_state(saved[0])
        state.generator.set_state(saved[1])
        state.source.load_state_dict(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state(saved[3], state.device)
        state.source.batch_size = saved[4]


def use_jvp_plan(state: TrainState, jvp: JvpPlan, console: Console | None) -> None:
    """Take the steps as `jvp` plans them: its JVP mode, eager, captured or compiled.  The console,
    on rank 0 only, says how."""
    if jvp.mode != state.jvp_mode:  # a resumed run's mode, from its checkpoint
        state.loss_fn = build_loss(state.cfg.loss.model_copy(update={"jvp": jvp.mode}))
        state.jvp_mode = jvp.mode
    if jvp.cuda_graph:
        state.step_graph = GraphedLossBackward(state.loss_fn, autocast_dtype(state.cfg.precision))
    if jvp.compile:
        state.compiled_evaluate = compile_evaluate(state.loss_fn, jvp.compile_mode)
    if console is None:
        return
    if jvp.meanflow:
        console.print(f"JVP mode: [bold]{jvp.mode}[/] ({escape(jvp.describe(state.model, state.device))})")
    if jvp.compile:
        console.print(
            f"torch.compile ({jvp.compile_mode}): the first step compiles the loss and its "
            "backward (seconds for small models, minutes for large ones)"
        )
    if jvp.tip:
        console.print(escape(jvp.tip))


def fit_batch_in_memory(state: TrainState, console: Console) -> MicroBatchPlan:
    """The probe step before training: split the batch into micro-batches if it does not fit."""
    cfg = state.cfg.train
    meter = make_meter(state.model, state.device, cfg.memory_limit_gb)
    batch = rank_batch_size(state.cfg)
    plan = plan_micro_batches(
        lambda size: probe_step(state, size),
        meter,
        batch,
        state.micro_batches,
        cfg.auto_microbatch,
        processes=distributed.world_size(),
    )
    # Every rank splits as finely as the rank that needed most: the same micro-batch size keeps
    # the ranks' shares of a shared data order aligned (LoaderSource) and their steps in lockstep.
    # (A finer split than this rank's own needs no more memory than the one it measured.)
    finest = distributed.max_across_ranks(plan.micro_batches, state.device)
    if finest != plan.micro_batches:
        plan = MicroBatchPlan(finest, batch // finest, plan.peak_bytes)
    if plan.micro_batches != state.micro_batches:
        console.print(f"[yellow]memory:[/] {plan.describe(batch)}")
    state.micro_batches = plan.micro_batches
    state.source.batch_size = plan.micro_batch_size
    return plan


def train_step(state: TrainState) -> dict[str, float]:
    """One optimiser step over `micro_batches` micro-batches of the configured batch."""
    cfg = state.cfg
    model, optimizer = state.model, state.optimizer
    state.source.batch_size = rank_batch_size(cfg) // state.micro_batches
    state.loss_fn.set_progress(state.step, cfg.train.steps)
    # Metrics over the micro-batches: the mean, except that a `max_` metric is the largest one.
    sums: dict[str, torch.Tensor] = {}
    for _ in range(state.micro_batches):
        for key, value in micro_batch_backward(state).items():
            if key not in sums:
                sums[key] = value
            elif distributed.is_max_metric(key):
                sums[key] = torch.maximum(sums[key], value)
            else:
                sums[key] = sums[key] + value
    # One device-to-host copy for the step's metrics, then those of the whole global batch.
    totals = {
        key: value if distributed.is_max_metric(key) else value / state.micro_batches
        for key, value in metrics_to_floats(sums).items()
    }
    totals = distributed.reduce_metrics(totals, state.device)
    distributed.all_reduce_gradients(model)
    if state.scaler is not None:
        state.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if cfg.optim.grad_clip > 0:
        grad_norm = totals["grad_norm"] = float(
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        )
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    # fp16's loss scaling makes inf gradients routine (the scaler skips those steps).
    check_finite_step(state, totals["loss"], grad_norm if state.scaler is None else 0.0)
    lr = learning_rate(cfg.optim, state.step)
    set_learning_rate(optimizer, lr)
    if state.scaler is not None:
        state.scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        state.scaler.update()
    else:
        optimizer.step()
    # A captured step, and a compiled one replaying CUDA graphs, add into gradient buffers that
    # must stay where they are: zero them in place (zoo.training.step_graph, compiled_step).
    optimizer.zero_grad(set_to_none=not keeps_grads_allocated(state))
    state.ema.update(model)
    state.step += 1
    totals["lr"] = lr
    return totals


# A resumed run would replay the same steps into the same divergence: the fix is a new run.
DIVERGED_FIX = "Start a new run with a lower optim.lr or a gradient clip (optim.grad_clip), or check the data"


def check_finite_step(state: TrainState, loss: float, grad_norm: float) -> None:
    """Stop a diverging run before its optimiser step: no non-finite value reaches the weights,
    and no checkpoint of them is written."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise DivergedError(
        f"training diverged at step {state.step + 1} (loss {loss:.4g}, gradient norm {grad_norm:.4g}); "
        f"stopped before updating the weights, {last_checkpoint_text(state)}. {DIVERGED_FIX}"
    )


def last_checkpoint_text(state: TrainState) -> str:
    if state.checkpoint_step is None:
        return "no checkpoint was written"
    return f"the last checkpoint (step {state.checkpoint_step}) is intact"


def check_finite_weights(state: TrainState) -> None:
    """A checkpoint never stores non-finite weights (model or EMA): one host sync per save."""
    tensors = [*state.model.parameters(), *state.ema.model.parameters()]
    if bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all()):
        return
    raise DivergedError(
        f"the weights became non-finite by step {state.step}; not saving them, "
        f"{last_checkpoint_text(state)}. {DIVERGED_FIX}"
    )


def quick_methods(state: TrainState) -> list[Method]:
    """The cheap periodic evaluation: the model's headline sampler only."""
    if state.is_meanflow:
        return [Method("meanflow", 1, 1)]
    return [Method("euler", 8, 8)]


def run_evaluation(state: TrainState, run: RunDir, final: bool, progress: TrainProgress) -> EvalReport:
    """Rank 0 only. The heartbeat says phase "eval" and stays fresh while it lasts."""
    cfg = state.cfg
    methods = None if final else quick_methods(state)
    return evaluate(
        state.ema.model,
        state.source,
        cfg.eval,
        meanflow=state.is_meanflow,
        seed=cfg.seed,
        methods=methods,
        with_floor=final,
        progress=progress.rich,
        on_progress=PhaseHeartbeat(run, "eval"),
        feature_net=state.feature_net,
    )


def save(run: RunDir, state: TrainState, metrics: dict[str, float], archive: bool) -> Path:
    check_finite_weights(state)
    payload = checkpoint_payload(state, metrics)
    save_checkpoint(run.last, payload)
    if archive:
        save_checkpoint(run.archive(state.step), payload)
    state.checkpoint_step = state.step
    save_loss_plot(run)  # a few tens of ms: far less than writing the checkpoint
    return run.last


def train_run(
    cfg: ZooConfigBody,
    resume: bool = False,
    console: Console | None = None,
    command: str | None = None,
    restart: bool = False,
) -> RunDir:
    """Train `cfg` into `<output_dir>/<run_name>/`, or continue that run with `resume`.

    SIGINT, SIGTERM and SIGHUP stop it after the step in progress with a checkpoint of that step and
    the heartbeat "interrupted"; it then raises RunInterrupted, whose message says how to resume.
    `restart`: start afresh a run folder that holds no checkpoint (check_run).
    """
    console = console or Console(stderr=True)
    if cfg.run_name is None:
        raise RunError("a run needs a name: set run_name (zoo train picks one when --run-name is not given)")
    with StopSignals() as stops:
        try:
            with contextlib.ExitStack() as held:
                return start_and_train(cfg, resume, restart, console, command, stops, held)
        except StopRequested as stop:
            # Before the first step: nothing of this session was written.
            name = signal.Signals(stop.signum).name
            what = f"resume with `{resume_command(cfg)}`" if resume else "nothing was written"
            raise RunInterrupted(
                f"interrupted by {name} before training started; {what}", stop.signum
            ) from None


def start_and_train(
    cfg: ZooConfigBody,
    resume: bool,
    restart: bool,
    console: Console,
    command: str | None,
    stops: StopSignals,
    held: contextlib.ExitStack,
) -> RunDir:
    """train_run's work; `held` keeps the run's lock (RunLock) until train_run returns."""
    device = resolve_device(cfg.device)
    # JVP settings that cannot run together are refused before anything is built.
    jvp = plan_run(cfg, device, kept_mode=cfg.loss.jvp if resume else None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        enable_cuda_tf32()
    main = distributed.is_main()
    # Rank 0 takes the run's lock here, before minutes of building: a second start of the run is
    # refused now, and `held` keeps the lock until train_run returns.
    run = check_run(cfg.output_dir, cfg.run_name, resume, restart, lock=held, rank0=main)
    if cfg.experiment_log:  # appended to when the run ends: checked before the run begins
        check_writable_file(cfg.experiment_log, "experiment_log")
    # Build everything that can fail on bad input (data, model) before the run folder exists,
    # so a failed start leaves nothing behind.
    try:
        state = build_state(cfg, device, jvp)
    except ValueError as exc:
        # What the schema cannot see (e.g. a resolution the network does not have, a train_size
        # larger than the dataset) surfaces while building; it is still the config's fault.
        raise ConfigError(f"the configuration cannot be built: {exc}") from None
    loaded = None
    if resume:
        loaded, jvp = restore_from_last(state, run, device)
    if main and wants_features(cfg.eval, state.source):
        # Trained on first use (minutes): before the run folder exists, so a dataset without one,
        # or too small an eval.n_samples, stops the run before it starts.
        with step_bar(console, f"feature network for {cfg.data.name}") as on_step:
            state.feature_net = feature_net_for(cfg.eval, state.source, cfg.data, device, on_step)
    use_jvp_plan(state, jvp, console if main else None)
    plan = fit_batch_in_memory(state, console)
    stops.check(device)  # a signal during the memory probe: stop now, before the folder is written
    config_dict = config_to_dict(cfg)
    tracker: Tracker = make_tracker(
        cfg.tracking.enabled and main, cfg.tracking.project, cfg.run_name, config_dict, resume
    )
    # From here on the run folder is written: every refusal above has left it untouched.
    if main:
        open_run_folder(run, state, plan, restart, loaded)
    try:
        train_and_finish(state, run, tracker, console, command, stops)
    finally:
        with stops.held("closing the experiment tracker first"):
            tracker.finish()
    return run


def restore_from_last(
    state: TrainState, run: RunDir, device: torch.device
) -> tuple[tuple[int, int], JvpPlan]:
    """A resumed run's state from its last checkpoint, once the checkpoint is known to be this
    run's and to fit its config: (the checkpoint's file stamp as read, the run's JVP plan)."""
    loaded = file_stamp(run.last)
    # RNG states must stay CPU byte tensors; load_state_dict moves weights to the device.
    payload = load_checkpoint(run.last, map_location="cpu")
    check_checkpoint_owner(run, payload["run_name"])
    check_resume_config(payload["config"], state.cfg)
    restore(state, payload)
    check_steps_left(state, run)
    return loaded, plan_run(state.cfg, device, kept_mode=payload["jvp_mode"])


def open_run_folder(
    run: RunDir,
    state: TrainState,
    plan: MicroBatchPlan,
    restart: bool,
    loaded: tuple[int, int] | None,
) -> None:
    """Create the run folder (this process holds its lock since check_run), then write its config
    and first heartbeat.  loaded: the last checkpoint's file stamp as a resume read it (None for a
    new run); refused if another process has replaced the checkpoint since (one that could not
    take the lock: a filesystem without locks)."""
    prepare_run_folder(run, loaded is not None, restart)
    if loaded is not None:
        if file_stamp(run.last) != loaded:
            raise CheckpointReplacedError(
                f"{run.last} was replaced while this resume started (another process trained "
                f"run {state.cfg.run_name!r} meanwhile); resume again"
            )
        drop_metrics_after(run, state.step)
    run.config.write_text(config_to_toml(state.cfg))
    run.write_heartbeat(
        status="running",
        phase="train",
        step=state.step,
        loss=None,
        error=None,
        device=str(state.device),
        jvp_mode=state.jvp_mode,
        micro_batches=plan.micro_batches,
        peak_memory_bytes=plan.peak_bytes,
    )


def train_and_finish(
    state: TrainState,
    run: RunDir,
    tracker: Tracker,
    console: Console,
    command: str | None,
    stops: StopSignals,
) -> None:
    """The training loop and the final evaluation; a stop or failure is recorded in the run folder."""
    main = distributed.is_main()
    try:
        with TrainProgress(console, state.cfg.train.steps, state.step, stops, enabled=main) as progress:
            train_loop(state, run, tracker, progress, main, stops)
            stops.act_alone()
            final_report = run_evaluation(state, run, final=True, progress=progress) if main else None
        if main:
            # Finished is finished: a late signal must not turn it into "interrupted".
            with stops.held(FINISH_NOTICE):
                finish_run(state, run, tracker, final_report, command, console)
    except StopRequested as stop:
        message = stop_run(state, run, stop.signum) if main else "interrupted"
        raise RunInterrupted(message, stop.signum) from None
    except BaseException as exc:
        if main:
            mark_failed(run, exc, state.step)
        raise


def file_stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def mark_failed(run: RunDir, exc: BaseException, step: int) -> None:
    """The heartbeat says "failed" and why; if even that cannot be written (the disk that failed the
    run), the error in flight is what matters."""
    try:
        run.write_heartbeat(status="failed", error=f"{type(exc).__name__}: {exc}", step=step)
    except OSError:
        pass


def check_steps_left(state: TrainState, run: RunDir) -> None:
    """A resumed run must have steps left, or a final evaluation it did not get to."""
    steps = state.cfg.train.steps
    finished = (run.read_heartbeat() or {}).get("status") == "finished"
    if state.step > steps or (state.step == steps and finished):
        raise RunError(
            f"run {state.cfg.run_name!r} is already at step {state.step} of {steps}; "
            "raise train.steps (--steps) to continue it"
        )


def resume_command(cfg: ZooConfigBody) -> str:
    """How to continue this run: `zoo train PRESET --run-name NAME --resume` (and its output_dir)."""
    parts = [
        "zoo",
        "train",
        *([cfg.preset] if cfg.preset else []),
        "--run-name",
        str(cfg.run_name),
        "--resume",
    ]
    if cfg.output_dir != ZooConfigBody.model_fields["output_dir"].default:
        parts.insert(2 + bool(cfg.preset), f"output_dir={cfg.output_dir}")
    return " ".join(shlex.quote(p) for p in parts)


def stop_run(state: TrainState, run: RunDir, signum: int) -> str:
    """Rank 0, on SIGINT/SIGTERM: checkpoint the step reached, mark the heartbeat, say how to resume.

    The state is that of a whole step: signals wait for the step in progress (StopSignals.held),
    and what else can be interrupted (evaluation, sample grids) does not change it.
    """
    if state.checkpoint_step != state.step:
        save(run, state, state.metrics, archive=False)
    name = signal.Signals(signum).name
    message = (
        f"interrupted by {name} at step {state.step}, last checkpoint at step {state.checkpoint_step}; "
        f"resume with `{resume_command(state.cfg)}`"
    )
    run.write_heartbeat(
        status="interrupted",
        signal=name,
        message=message,
        step=state.step,
        last_checkpoint=run.last.name,
        checkpoint_step=state.checkpoint_step,
    )
    return message


def keeps_grads_allocated(state: TrainState) -> bool:
    compiled = state.compiled_evaluate is not None and keeps_grads(state.cfg.train.compile_mode)
    return state.step_graph is not None or compiled


def drop_metrics_after(run: RunDir, step: int) -> None:
    """A resumed run repeats the steps after its last checkpoint: forget their first records."""
    kept = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    atomic_write_text(run.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def train_loop(
    state: TrainState, run: RunDir, tracker: Tracker, progress: TrainProgress, main: bool, stops: StopSignals
) -> None:
    cfg = state.cfg.train
    # time/elapsed_s continues over resumes; the rate is this session's.
    session_start, session_step = time.time(), state.step
    run_start = session_start - state.elapsed_s
    if periodic_evaluation_due(state):
        # Resumed at an evaluation step: its evaluation may never have completed (a stop or a crash
        # during it, or between it and the step's checkpoint, written first).  Rank 0 redoes it
        # unless metrics.jsonl records it.
        periodic_evaluation(state, run, tracker, progress, here=main and not evaluated_at(run, state.step))
    while state.step < cfg.steps:
        # A signal waits for the step, its records and its checkpoint to be complete.
        with stops.held(STEP_NOTICE):
            metrics = state.metrics = train_step(state)
            state.elapsed_s = time.time() - run_start
            progress.update(state.step, metrics)
            if main:
                record_spikes(state, run, tracker, progress, metrics)
                log_and_save(
                    state, run, tracker, metrics, session_start, session_step, state.step == cfg.steps
                )
        stops.check(state.device)  # under torchrun, every rank stops after the same step
        if periodic_evaluation_due(state):
            periodic_evaluation(state, run, tracker, progress, here=main)


def periodic_evaluation_due(state: TrainState) -> bool:
    """Every train.eval_every steps, except at the last step, which gets the final evaluation."""
    cfg = state.cfg.train
    return cfg.eval_every > 0 and 0 < state.step < cfg.steps and state.step % cfg.eval_every == 0


def evaluated_at(run: RunDir, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation of `step`.

    metrics.jsonl is the record of evaluations that completed: log_evaluation appends the record
    after the evaluation and its picture, and a resumed run first drops every record after its
    checkpoint (drop_metrics_after).  Simpler than a mark in the checkpoint, which is written
    before the evaluation and would have to be rewritten after it.
    """
    return any(r["step"] == step and any(key.startswith("eval/") for key in r) for r in run.read_metrics())


def periodic_evaluation(
    state: TrainState, run: RunDir, tracker: Tracker, progress: TrainProgress, here: bool
) -> None:
    """The step reached is evaluated by the process told `here` (rank 0 at most); every rank
    meets it after."""
    if here:
        report = run_evaluation(state, run, final=False, progress=progress)
        log_evaluation(state, run, tracker, report, tag=f"step_{state.step:07d}")
        run.write_heartbeat(status="running", phase="train")
    # The other ranks waited here, not in the next step's all-reduce (see wait_for_main).
    distributed.wait_for_main()


def record_spikes(
    state: TrainState, run: RunDir, tracker: Tracker, progress: TrainProgress, metrics: dict[str, float]
) -> None:
    """Rank 0, after a step: print and record its loss spikes (zoo.training.spikes)."""
    spikes = state.spikes.update(state.step, metrics)
    if not spikes:
        return
    shown, skipped = state.spikes.to_print(state.step)
    if shown:
        more = f" ({skipped} more spike steps since the last one shown)" if skipped else ""
        progress.rich.console.print(f"[yellow]{'; '.join(s.describe() for s in spikes)}{more}[/]")
    record = {f"train/spike_ratio/{s.metric}": s.ratio for s in spikes} | {"train/spikes": state.spikes.count}
    run.append_metrics({"step": state.step, "time": time.time(), **record})
    tracker.log(record, step=state.step)


def log_and_save(
    state: TrainState,
    run: RunDir,
    tracker: Tracker,
    metrics: dict[str, float],
    session_start: float,
    session_step: int,
    at_end: bool,
) -> None:
    """Rank 0, after a step: metrics and heartbeat every log_every steps, checkpoints every save_every."""
    cfg = state.cfg.train
    state.loss_window.append(metrics["loss"])
    if state.step % cfg.log_every == 0 or at_end:
        record = {f"train/{k}": v for k, v in metrics.items()}
        record["train/loss_avg"] = sum(state.loss_window) / len(state.loss_window)
        record["train/spikes"] = state.spikes.count
        record["time/elapsed_s"] = state.elapsed_s
        record["time/steps_per_s"] = (state.step - session_step) / max(time.time() - session_start, 1e-9)
        state.loss_window.clear()
        run.append_metrics({"step": state.step, "time": time.time(), **record})
        tracker.log(record, step=state.step)
        run.write_heartbeat(status="running", phase="train", step=state.step, loss=metrics["loss"])
    archive = at_end or (cfg.archive_every > 0 and state.step % cfg.archive_every == 0)
    if state.step % cfg.save_every == 0 or archive:
        save(run, state, metrics, archive)
        run.write_heartbeat(
            status="running", step=state.step, last_checkpoint=run.last.name, checkpoint_step=state.step
        )


def log_evaluation(state: TrainState, run: RunDir, tracker: Tracker, report: EvalReport, tag: str) -> None:
    cfg = state.cfg
    image, caption = save_samples(
        state.ema.model,
        state.source,
        headline_method(cfg.eval, state.is_meanflow),  # the sampler `zoo eval` pictures
        run.samples / f"{tag}.png",
        cfg.eval,
        seed=cfg.seed + 1,
        on_batch=PhaseHeartbeat(run, "eval"),
    )
    # The record last: it marks the evaluation complete (evaluated_at).
    metrics = report.metrics()
    run.append_metrics({"step": state.step, "time": time.time(), **metrics})
    tracker.log(metrics, step=state.step)
    tracker.log_image("samples", image, step=state.step, caption=caption)


def finish_run(
    state: TrainState,
    run: RunDir,
    tracker: Tracker,
    report: EvalReport,
    command: str | None,
    console: Console,
) -> None:
    log_evaluation(state, run, tracker, report, tag="final")
    atomic_write_json(
        run.eval_json, {"step": state.step, "checkpoint": run.archive(state.step).name, **report.to_dict()}
    )
    save_loss_plot(run)
    last_metrics = state.metrics
    run.write_heartbeat(status="finished", phase="done", step=state.step, loss=last_metrics.get("loss"))
    if state.cfg.experiment_log:
        # Log the JVP strategy actually used, not "auto".
        logged_cfg = state.cfg.model_copy(
            update={"loss": state.cfg.loss.model_copy(update={"jvp": state.jvp_mode})}
        )
        append_run_entry(
            Path(state.cfg.experiment_log),
            command=command or " ".join(sys.argv),
            cfg=logged_cfg,
            run=run,
            report=report,
            # With p = 1 the adaptive loss sits near 1 by construction: mse is the number that moves.
            final_metrics={k: v for k, v in last_metrics.items() if k in ("loss", "mse", "grad_norm")},
        )
        console.print(
            f"logged to {state.cfg.experiment_log} (the experiment record; `experiment_log=` turns this off)"
        )
