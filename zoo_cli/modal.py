"""`zoo modal submit | status | logs | stop`: training runs on Modal GPUs.

Every command first checks, in well under a second, that a Modal token is configured and the
Modal server answers (zoo.remote.credentials); without them it says so and exits 1, pointing
at `modal setup`, instead of hanging for a minute inside the Modal client.
"""

import json
import math
import shlex
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from zoo.config.loading import ConfigError, check_new_run_jvp, deep_merge, load_config, parse_overrides
from zoo.remote.layout import REGISTRY, check_run_name
from zoo.remote.listing import RunInfo, list_store_runs
from zoo.remote.status import CallState, format_duration, parse_duration
from zoo.remote.store import RunStore
from zoo.remote.submission import (
    CANCELLED_CONTAINER_GRACE_S,
    DamagedRecordError,
    SubmitError,
    check_gpu_split,
    check_retries,
    check_timeout,
    launch_submission,
    parse_gpu,
    prepare_submission,
    read_submission,
    remote_config,
    stopped_path,
)
from zoo.runs import default_run_name
from zoo_cli.errors import fail
from zoo_cli.runs_cmds import (
    DEFAULT_VOLUME,
    StallOption,
    VolumeDirOption,
    VolumeOption,
    duration_or_exit,
    metric_text,
    print_table,
    remote_store_or_exit,
    run_record,
    styled_state,
)
from zoo_cli.train import (
    BatchSizeOption,
    OverridesArgument,
    PrecisionOption,
    RatioOption,
    SeedOption,
    StepsOption,
    flag_overrides,
)

console = Console(soft_wrap=True)  # long paths stay on one line (copyable, greppable)
err_console = Console(stderr=True)

app = typer.Typer(
    name="modal",
    help="Train on Modal GPUs: submit a run (detached), watch it, read its logs, stop it.",
    no_args_is_help=True,
)


@app.command()
def submit(
    preset: Annotated[
        str | None, typer.Argument(help="preset name or .toml file (not needed with --resume)")
    ] = None,
    overrides: OverridesArgument = None,
    gpu: Annotated[
        str, typer.Option(help="A100-40GB, A100-80GB, H100, H100:8 (several GPUs: data-parallel), ...")
    ] = "A100-40GB",
    timeout: Annotated[str, typer.Option(help="per attempt, at most 24h (e.g. 12h, 90m)")] = "12h",
    retries: Annotated[
        int,
        typer.Option(help="attempts after a failure or preemption, 0 to 10; each resumes from last.pt"),
    ] = 5,
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="name of the remote run (default: PRESET-DATE-TIME)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the remote run --run-name from its last.pt")
    ] = False,
    ratio: RatioOption = None,
    steps: StepsOption = None,
    batch_size: BatchSizeOption = None,
    seed: SeedOption = None,
    precision: PrecisionOption = None,
    volume: VolumeOption = DEFAULT_VOLUME,
) -> None:
    """Start a training run on Modal and return at once; it survives this terminal closing."""
    # Everything typed here is checked (the same errors as `zoo train`, exit 2) before Modal is
    # asked anything: a typo should not be answered with "no Modal token".
    cfg = None
    try:
        gpu_request = parse_gpu(gpu)
        timeout_s = check_timeout(parse_duration(timeout))
        check_retries(retries)
        given = deep_merge(
            parse_overrides(overrides or []),
            flag_overrides(ratio=ratio, steps=steps, batch_size=batch_size, seed=seed, precision=precision),
        )
        if resume:
            if run_name is None:
                raise fail(
                    "--resume needs --run-name: the remote run to continue (zoo ckpts --remote lists them)", 2
                )
            check_run_name(run_name)  # its stored config, extended by `given`, is checked once read
        else:
            if preset is None:
                raise fail(
                    "give a preset or a .toml file, e.g. `zoo modal submit cifar10 --gpu A100-80GB`", 2
                )
            cfg = load_config(preset, given)
            check_new_run_jvp(cfg)
            run_name = run_name or cfg.run_name or default_run_name(cfg.preset)
            cfg = remote_config(cfg, run_name)
            check_gpu_split(cfg, gpu_request)
    except (ValueError, ConfigError) as exc:
        raise fail(str(exc), 2) from None
    store = remote_store_or_exit(volume, None)
    command = "zoo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        submission = prepare_submission(
            store, run_name, cfg, given, gpu_request, timeout_s, retries, command, call_state_or_warn
        )
    except (ConfigError, SubmitError, ValueError) as exc:
        # A name taken, a run still running or nothing to resume: the command must change.
        raise fail(str(exc), 2) from None
    except DamagedRecordError as exc:
        raise fail(str(exc), 1) from None
    from zoo.remote.modal_app import ModalLauncher

    if submission.cancel_call is not None:
        # Said before the launch: a start that then fails must not hide that the call was cancelled.
        console.print(
            f"cancelling the previous call {submission.cancel_call} of {run_name} (it had not ended); "
            f"waiting {CANCELLED_CONTAINER_GRACE_S:.0f} s for its container to stop writing"
        )
    elif submission.wait_s > 0:
        console.print(
            f"{run_name} was stopped {submission.stopped_ago:.0f} s ago; "
            f"waiting {math.ceil(submission.wait_s)} s more for its container to stop writing"
        )
    record = launch_submission(store, submission, ModalLauncher(volume))
    console.print(f"run      [bold]{run_name}[/]")
    console.print(f"call id  {record['call_id']}")
    console.print(
        f"gpu      {gpu_request.modal_spec}, timeout {format_duration(timeout_s)} per attempt, "
        f"{retries} retries"
    )
    console.print(
        f"next     zoo modal status {run_name}  |  zoo modal logs {run_name}  |  zoo sync && zoo ckpts"
    )


def status_table(infos: list[RunInfo], now: float) -> Table:
    table = Table(title="remote runs")
    for column, justify in (
        ("run", "left"),
        ("status", "left"),
        ("step", "right"),
        ("loss", "right"),
        ("last checkpoint", "left"),
        ("elapsed", "right"),
        ("heartbeat", "right"),
        ("gpu", "left"),
        ("key metric", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # names whole, if need be on two lines
    for info in infos:
        s = info.status
        newest = info.checkpoints[0] if info.checkpoints else None
        table.add_row(
            info.name,
            styled_state(info),
            "" if s.step is None else str(s.step),
            "" if s.loss is None else f"{s.loss:.4g}",
            "—" if newest is None else f"{newest.name} ({format_duration(now - newest.mtime)} ago)",
            "" if s.elapsed is None else format_duration(s.elapsed),
            "" if s.updated_ago is None else f"{format_duration(s.updated_ago)} ago",
            info.submission["gpu"] if info.submission else "",
            metric_text(info),
        )
    return table


def submission_or_exit(store: RunStore, run: str) -> dict[str, Any] | None:
    try:
        return read_submission(store, run)
    except DamagedRecordError as exc:
        raise fail(str(exc), 1) from None


def call_state_or_warn(call_id: str) -> CallState | None:
    """Modal's view of a call; None, with a warning, when Modal cannot be asked (the files then judge)."""
    from zoo.remote.modal_app import CLIENT_ERRORS, call_state

    try:
        return call_state(call_id)
    except CLIENT_ERRORS as exc:
        err_console.print(
            f"[yellow]warning:[/] could not ask Modal about call {call_id} ({type(exc).__name__}: {exc}); "
            "its run's state comes from its files alone",
            highlight=False,
        )
        return None


@app.command(
    help="Each remote run: running, finished, failed (with the error), stalled or stopped; "
    "step, loss, checkpoint."
)
def status(
    run: Annotated[str | None, typer.Argument(help="one run (default: every remote run)")] = None,
    stall_after: StallOption = "15m",
    volume: VolumeOption = DEFAULT_VOLUME,
    volume_dir: VolumeDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    stall = duration_or_exit(stall_after, "--stall-after")
    store = remote_store_or_exit(volume, volume_dir)
    lookup = call_state_or_warn if volume_dir is None else None
    now = time.time()
    infos = list_store_runs(store, now, stall, call_lookup=lookup)
    if run is not None:
        infos = [i for i in infos if i.name == run]
        if not infos:
            raise fail(f"no remote run {run!r} on {store.describe()}; `zoo modal status` lists them", 1)
    if as_json:
        console.print_json(json.dumps([run_record(i, now) for i in infos]))
        return
    if not infos:
        console.print(f"no remote runs on {store.describe()}; start one with `zoo modal submit PRESET`")
        return
    print_table(status_table(infos, now))
    for info in infos:
        if info.status.detail:
            console.print(f"[bold]{info.name}[/] {styled_state(info)}: {info.status.detail}", highlight=False)
    if run is not None and infos[0].submission:
        submission = infos[0].submission
        console.print(
            f"submitted {format_duration(now - submission['submitted'])} ago: {submission['command']}",
            highlight=False,
        )
        console.print(
            f"call id {submission.get('call_id')}; app {submission.get('app_name')}", highlight=False
        )


@app.command()
def logs(
    run: Annotated[str, typer.Argument(help="the remote run")],
    tail: Annotated[int, typer.Option(min=1, max=1_000_000, help="how many recent lines")] = 200,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    from_file: Annotated[
        bool,
        typer.Option(
            "--file", help="print train.log from the Volume (all attempts; kept after Modal's log retention)"
        ),
    ] = False,
    volume: VolumeOption = DEFAULT_VOLUME,
    volume_dir: VolumeDirOption = None,
) -> None:
    """The training output of a remote run."""
    store = remote_store_or_exit(volume, volume_dir)
    submission = submission_or_exit(store, run)
    if submission is None:
        raise fail(f"no remote run {run!r} on {store.describe()}; `zoo modal status` lists them", 1)
    if from_file or volume_dir is not None:
        path = f"{REGISTRY}/{run}/train.log"
        if store.stat(path) is None:
            raise fail(f"{run} has no train.log yet (the container has not started training)", 1)
        lines = store.read_text(path).splitlines()
        sys.stdout.write("\n".join(lines[-tail:]) + "\n")
        return
    if not submission.get("call_id"):
        raise fail(
            f"{run} has no Modal call id (its submission did not complete); see `zoo modal status {run}`", 1
        )
    from zoo.remote.modal_app import log_lines

    for line in log_lines(submission["call_id"], tail, follow):
        sys.stdout.write(line)
        sys.stdout.flush()


@app.command()
def stop(
    run: Annotated[str, typer.Argument(help="the remote run")],
    volume: VolumeOption = DEFAULT_VOLUME,
) -> None:
    """Cancel a remote run's function call and stop its container; its checkpoints stay on the Volume."""
    store = remote_store_or_exit(volume, None)
    submission = submission_or_exit(store, run)
    if submission is None or not submission.get("call_id"):
        raise fail(f"no submitted remote run {run!r} on {store.describe()}; `zoo modal status` lists them", 1)
    from zoo.remote.modal_app import cancel

    cancel(submission["call_id"])
    store.write_bytes(stopped_path(run), json.dumps({"stopped": time.time()}).encode())
    console.print(
        f"stopped {run} (call {submission['call_id']}); "
        f"resume it with `zoo modal submit --resume --run-name {run}`"
    )
