"""`zoo train PRESET|path.toml [key=value ...]`."""

import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from zoo.config.loading import (
    ConfigError,
    check_batch_split,
    config_from_dict,
    config_to_dict,
    deep_merge,
    load_config,
    parse_overrides,
    resolve_output_dir,
)
from zoo.config.schema import ZooConfigBody
from zoo.output_paths import check_writable_file
from zoo.runs import RunDir, RunInterrupted, check_checkpoint_owner, check_run, default_run_name
from zoo_cli.errors import err_console, fail, user_errors
from zoo_cli.render import eval_table, make_console, print_config

console = make_console()

# The options `zoo train` shares with `zoo modal submit`.
OverridesArgument = Annotated[
    list[str] | None, typer.Argument(help="dotted overrides, e.g. loss.ratio=0.75 optim.lr=1e-4")
]
# Their bounds are the config's, which checks them (and says so in one line).
RatioOption = Annotated[float | None, typer.Option(help="MeanFlow fraction of r != t samples (loss.ratio)")]
StepsOption = Annotated[int | None, typer.Option(help="optimiser steps (train.steps)")]
BatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", help="batch per optimiser step (train.batch_size)")
]
SeedOption = Annotated[int | None, typer.Option(help="random seed (0 to 2**32 - 1)")]
PrecisionOption = Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (autocast)")]


def flag_overrides(**flags: Any) -> dict[str, Any]:
    """Short flags as nested overrides: --ratio -> loss.ratio, --steps -> train.steps, ..."""
    paths = {
        "ratio": ("loss", "ratio"),
        "steps": ("train", "steps"),
        "batch_size": ("train", "batch_size"),
        "device": ("device",),
        "run_name": ("run_name",),
        "seed": ("seed",),
        "precision": ("precision",),
        "data_dir": ("data", "root"),
        "threads": ("threads",),
    }
    nested: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        *parents, leaf = paths[name]
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def resume_config(
    run_name: str, output_dir: str, preset: str | None, overrides: dict[str, Any]
) -> ZooConfigBody:
    """A resumed run starts from its own stored config; the command line may only extend it."""
    from zoo.checkpoints import load_checkpoint
    from zoo.inference import RESUME_KEYS, check_payload

    run = check_run(output_dir, run_name, resume=True)
    payload = load_checkpoint(run.last)
    check_payload(payload, run.last, RESUME_KEYS)
    check_checkpoint_owner(run, payload["run_name"])
    stored = payload["config"]
    if preset is not None and stored.get("preset") not in (preset, None) and not preset.endswith(".toml"):
        raise ConfigError(
            f"run {run_name!r} was trained from preset {stored.get('preset')!r}, not {preset!r}; "
            "resume it with its own preset (or omit the preset)"
        )
    return config_from_dict(deep_merge(stored, overrides))


def train(
    preset: Annotated[
        str | None, typer.Argument(help="preset name (see configs/) or a path to a .toml file")
    ] = None,
    overrides: OverridesArgument = None,
    ratio: RatioOption = None,
    steps: StepsOption = None,
    batch_size: BatchSizeOption = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = None,
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="name of the run folder (default: PRESET-DATE-TIME)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run named by --run-name from its last.pt")
    ] = False,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="start afresh a run folder that holds no checkpoint and no live writer "
            "(a run stopped before its first save); its files are deleted",
        ),
    ] = False,
    seed: SeedOption = None,
    precision: PrecisionOption = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="dataset folder (data.root)")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (0 = torch default; 1 on a shared machine)")
    ] = None,
    nproc: Annotated[
        int,
        typer.Option("--nproc", min=1, max=256, help="data-parallel processes on this machine (torchrun)"),
    ] = 1,
) -> None:
    """Train a flow-matching or MeanFlow model; writes outputs/<run_name>/."""
    with user_errors():
        given = deep_merge(
            parse_overrides(overrides or []),
            flag_overrides(
                ratio=ratio,
                steps=steps,
                batch_size=batch_size,
                device=device,
                run_name=run_name,
                seed=seed,
                precision=precision,
                data_dir=data_dir,
                threads=threads,
            ),
        )
        if resume and restart:
            raise fail("--resume continues a run from its checkpoint, --restart starts one afresh: give one")
        if resume:
            if run_name is None:
                raise fail("--resume needs --run-name: the run to continue (zoo ckpts lists them)")
            output_dir = resolve_output_dir(preset, given)
            cfg = resume_config(run_name, output_dir, preset, given)
        else:
            if preset is None:
                raise fail("give a preset or a .toml file, e.g. `zoo train moons` (presets live in configs/)")
            cfg = load_config(preset, given)
            if cfg.run_name is None:
                cfg = cfg.model_copy(update={"run_name": default_run_name(cfg.preset)})
            # A name collision or an output_dir that cannot be written: said before anything else.
            check_run(cfg.output_dir, cfg.run_name, resume=False, restart=restart)
        if cfg.experiment_log:  # appended to when the run ends: a run must not fail at its last step
            check_writable_file(cfg.experiment_log, "experiment_log")
        if nproc > 1:
            check_batch_split(cfg, nproc, how="--nproc")
            returncode = launch_torchrun(
                nproc, cfg, "--resume" if resume else "--restart" if restart else "--fresh"
            )
            if returncode != 0:
                raise typer.Exit(returncode)
            report_run(RunDir(Path(cfg.output_dir) / cfg.run_name))
            return
        from zoo import distributed
        from zoo.devices import resolve_device

        under_torchrun = distributed.env_world_size() > 1
        if under_torchrun:
            # `torchrun -m zoo_cli.main train ...`: every process must name the same run folder.
            if "run_name" not in given:
                raise fail("under torchrun give --run-name: every process must write the same run")
            distributed.init(device_type=resolve_device(cfg.device).type)

        if distributed.is_main():
            print_config(console, cfg, title=f"run {cfg.run_name}")
        from zoo.training.trainer import train_run

        command = command_line(
            preset,
            overrides or [],
            {
                "--ratio": ratio,
                "--steps": steps,
                "--batch-size": batch_size,
                "--device": device,
                "--run-name": cfg.run_name,
                "--seed": seed,
                "--precision": precision,
                "--data-dir": data_dir,
                "--threads": threads,
            },
            resume,
        )
        main = distributed.is_main()
        try:
            run = train_run(cfg, resume=resume, command=command, restart=restart)
        except RunInterrupted as exc:
            if main:
                report_interrupted(exc)
            raise typer.Exit(exc.exit_code) from None
        finally:
            if under_torchrun:
                distributed.shutdown()
    if main:
        report_run(run)


def report_interrupted(exc: RunInterrupted) -> None:
    """One line: where training stopped, its last checkpoint, and the command that resumes it."""
    try:
        err_console.print(f"[bold yellow]{escape(str(exc))}[/]", highlight=False, markup=True)
    except (OSError, SystemExit):
        # Nobody reading (rich: EPIPE as SystemExit(1)); the run still exits 128 + signal.
        pass


def command_line(preset: str | None, overrides: list[str], flags: dict[str, Any], resume: bool) -> str:
    """The command as the user could type it again (recorded in EXPERIMENT_LOG.md)."""
    parts = ["zoo", "train", *([preset] if preset else []), *overrides]
    for flag, value in flags.items():
        if value is not None:
            parts += [flag, str(value)]
    if resume:
        parts.append("--resume")
    return " ".join(shlex.quote(p) for p in parts)


def report_run(run: RunDir) -> None:
    import json

    from zoo.evaluation import EvalReport

    data = json.loads(run.eval_json.read_text())
    console.print(
        eval_table([(run.name, EvalReport.from_dict(data))], title=f"{run.name} at step {data['step']}")
    )
    console.print(f"run folder: [bold]{run.root}[/]  (samples: {run.samples / 'final.png'})")


def launcher_ignored_notice(signum: int, grace_s: int) -> str:
    """Said for each signal after the first that reached `zoo train --nproc`: passing it on too
    could cut the ranks' checkpoint short."""
    from zoo.interrupts import signal_display_name

    return (
        f"{signal_display_name(signum)} again: ignored, so the ranks' checkpoint is written whole; "
        "they stop after their step "
        f"(torchrun kills them {grace_s} s after the first signal at the latest)"
    )


def launch_torchrun(nproc: int, cfg: ZooConfigBody, mode: str) -> int:
    """Re-run this command under torchrun with the resolved config, one process per device."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="zoo-torchrun-") as folder:
        config_path = Path(folder) / "config.json"
        config_path.write_text(json.dumps(config_to_dict(cfg)))
        from zoo import distributed
        from zoo.interrupts import write_from_handler

        args = [str(config_path), mode]
        command = distributed.torchrun_command(nproc, "zoo_cli.distributed_entry", args)
        console.print(f"launching {nproc} processes: {' '.join(command)}")
        grace_s = distributed.shutdown_grace_s()
        if grace_s != distributed.STOP_GRACE_S:
            console.print(
                "[yellow]this torch's torchrun has no --shutdown_timeout: a stopped run gets its "
                f"fixed {grace_s} s (not {distributed.STOP_GRACE_S} s) to finish its step and save "
                "the checkpoint[/]"
            )
        # Its own session: a Ctrl-C in the terminal reaches only this process, which passes it on
        # once, like a SIGTERM (timeout, a scheduler) or a kill aimed at this process alone, and a
        # hang-up (closed terminal or ssh) as SIGTERM.  torchrun passes it to the ranks, which stop
        # after the same step, save it, and rank 0 prints how to resume.
        received: list[int] = []
        processes: list[subprocess.Popen] = []

        def forward(signum: int, frame: object) -> None:
            if not received and processes:
                processes[0].send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
            elif received:
                write_from_handler(launcher_ignored_notice(signum, grace_s))
            received.append(signum)

        # An ignored signal stays ignored (`zoo train --nproc 2 &` in a script survives its Ctrl-C).
        caught = [
            s
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            if signal.getsignal(s) is not signal.SIG_IGN
        ]
        previous = {s: signal.signal(s, forward) for s in caught}
        try:
            processes.append(subprocess.Popen(command, env=os.environ.copy(), start_new_session=True))
            if received:  # arrived while starting
                processes[0].send_signal(signal.SIGTERM if received[0] == signal.SIGHUP else received[0])
            returncode = processes[0].wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if not received:
            return returncode
        # torchrun exits 1 whenever it was signalled, whatever its ranks did: the run's heartbeat
        # says whether it finished anyway (the signal came during its final records).
        heartbeat = RunDir(Path(cfg.output_dir) / cfg.run_name).read_heartbeat() or {}
        return 0 if heartbeat.get("status") == "finished" else 128 + received[0]
