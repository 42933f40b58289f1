"""`zoo sync`, `zoo ckpts [download]`, `zoo clean`: managing runs, local and on Modal.

The local store is a cfg-independent outputs folder (`--outputs`, default outputs/) and
trackio's TRACKIO_DIR.  The remote store is the Modal Volume (`--volume`), or with
`--volume-dir` any local directory with the Volume's layout (a copy made with
`modal volume get`, or a test fixture): then no Modal call is made at all.
"""

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from zoo.output_paths import check_writable_file
from zoo.remote.clean import CleanError, CleanPlan, check_pattern, execute_clean, plan_clean
from zoo.remote.credentials import ModalUnavailable, check_token
from zoo.remote.download import DownloadError, download_checkpoint, parse_checkpoint_spec, resolve_checkpoint
from zoo.remote.layout import DEFAULT_VOLUME, OUTPUTS, mirror_name
from zoo.remote.listing import CheckpointInfo, RunInfo, list_local_runs, list_store_runs
from zoo.remote.remote_store import open_remote_store
from zoo.remote.status import format_duration, parse_duration
from zoo.remote.store import LocalDirStore, RunStore, StoreError
from zoo.remote.sync import execute_sync, local_trackio_dir, plan_sync
from zoo.units import format_bytes
from zoo_cli.errors import fail, user_errors

console = Console(soft_wrap=True)  # long paths stay on one line (copyable, greppable)
err_console = Console(stderr=True)


STATE_STYLES = {
    "running": "green",
    "finished": "bold",
    "failed": "bold red",
    "stalled": "bold yellow",
    "stopped": "magenta",
    "dead": "bold red",
    "pending": "cyan",
    "unknown": "dim",
}

OutputsOption = Annotated[Path, typer.Option("--outputs", help="local folder of run folders")]
VolumeOption = Annotated[str, typer.Option("--volume", help="the Modal Volume holding remote runs")]
VolumeDirOption = Annotated[
    Path | None,
    typer.Option("--volume-dir", help="a local directory with the Volume's layout to use instead of Modal"),
]
StallOption = Annotated[
    str, typer.Option("--stall-after", help="a running run without heartbeat this long is stalled")
]


def remote_store_or_exit(volume: str, volume_dir: Path | None) -> RunStore:
    try:
        return open_remote_store(volume, volume_dir)
    except ModalUnavailable as exc:
        raise fail(str(exc), 1) from None
    except StoreError as exc:
        raise fail(str(exc), 2) from None


def token_problem() -> str | None:
    """Why no Modal token can be used (none configured, a broken ~/.modal.toml), or None."""
    try:
        check_token()
    except ModalUnavailable as exc:
        return str(exc)
    return None


def duration_or_exit(text: str, option: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise fail(f"{option}: {exc}", 2) from None


def print_table(table: Table) -> None:
    """In a terminal the table fits the window (a long name folds onto the next line, never cut
    to "…"); piped, it is as wide as its content, so each row is one line that grep can match."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    Console(soft_wrap=True, width=max(console.width, natural)).print(table)


def byte_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def styled_state(info: RunInfo) -> str:
    """The state, and for a running or stalled run its phase when not training ("running (eval)")."""
    phase = f" ({info.status.phase})" if info.status.phase not in (None, "train") else ""
    return f"[{STATE_STYLES[info.status.state]}]{info.status.state}[/]{phase}"


def metric_text(info: RunInfo) -> str:
    if info.key_metric is None:
        return "—"
    name, value = info.key_metric
    return f"{name.removeprefix('eval/')} {value:.4g}"


def run_record(info: RunInfo, now: float) -> dict:
    """A run as plain JSON (for --json)."""
    return {
        "run": info.name,
        "where": info.where,
        "state": info.status.state,
        "phase": info.status.phase,
        "detail": info.status.detail,
        "step": info.status.step,
        "loss": info.status.loss,
        "key_metric": list(info.key_metric) if info.key_metric else None,
        "checkpoints": [
            {
                "name": c.name,
                "step": c.step,
                "size": c.size,
                "age_s": now - c.mtime,
                "where": c.where,
                "damaged": c.damaged,
            }
            for c in info.checkpoints
        ],
    }


def checkpoint_label(info: RunInfo, checkpoint: CheckpointInfo) -> str:
    label = checkpoint.name
    if checkpoint.where == "local" and info.where != "local":
        label += " (downloaded)"
    if checkpoint.damaged is not None:
        label += " [bold red](damaged: refused by --resume, sample, eval)[/]"
    return label


def checkpoints_table(infos: list[RunInfo], now: float) -> Table:
    table = Table(title="runs and checkpoints")
    for column, justify in (
        ("run", "left"),
        ("where", "left"),
        ("status", "left"),
        ("checkpoint", "left"),
        ("step", "right"),
        ("size", "right"),
        ("age", "right"),
        ("key metric", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # names whole, if need be on two lines
    for info in infos:
        rows = info.checkpoints or [None]
        for index, checkpoint in enumerate(rows):
            first = index == 0
            table.add_row(
                info.name if first else "",
                info.where if first else "",
                styled_state(info) if first else "",
                "—" if checkpoint is None else checkpoint_label(info, checkpoint),
                "" if checkpoint is None or checkpoint.step is None else str(checkpoint.step),
                "" if checkpoint is None else format_bytes(checkpoint.size),
                "" if checkpoint is None else format_duration(now - checkpoint.mtime),
                metric_text(info) if first else "",
                end_section=index == len(rows) - 1,
            )
    return table


def sync(
    runs: Annotated[
        list[str] | None, typer.Argument(help="run names or patterns (default: every remote run)")
    ] = None,
    outputs: OutputsOption = Path("outputs"),
    trackio_dir: Annotated[
        Path | None, typer.Option("--trackio-dir", help="local trackio store (default: $TRACKIO_DIR)")
    ] = None,
    volume: VolumeOption = DEFAULT_VOLUME,
    volume_dir: VolumeDirOption = None,
) -> None:
    """Pull remote runs' metrics, configs, samples and trackio data (not checkpoints) into the local store."""
    store = remote_store_or_exit(volume, volume_dir)
    trackio_dir = trackio_dir or local_trackio_dir()
    plan = plan_sync(store, outputs, runs)
    with byte_progress() as progress:
        task = progress.add_task("sync", total=plan.transfer_bytes)
        report = execute_sync(
            store, plan, outputs, trackio_dir, runs, on_bytes=lambda n: progress.advance(task, n)
        )
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if not report.runs:
        console.print(
            f"no remote runs on {store.describe()}" + (f" matching {' '.join(runs)}" if runs else "")
        )
        return
    added = [(m.database, m.metrics_added + m.system_metrics_added) for m in report.merges]
    rows = ", ".join(f"{name} +{count}" for name, count in added if count) or "none new"
    console.print(f"synced {len(report.runs)} remote run(s) from {store.describe()}", highlight=False)
    console.print(
        f"  run files: {report.files_copied} new or changed ({format_bytes(report.bytes_copied)}) "
        f"in {outputs}/<run>{mirror_name('')}",
        highlight=False,
    )
    replaced = sum(m.metrics_replaced for m in report.merges)
    again = f" ({replaced} replaced by the same steps logged again after a retry)" if replaced else ""
    console.print(f"  trackio rows: {rows}{again}; media files: {report.media_copied}", highlight=False)
    console.print(
        f"trackio: [bold]trackio show[/] (TRACKIO_DIR={trackio_dir}); checkpoints: [bold]zoo ckpts[/]"
    )


ckpts_app = typer.Typer(
    name="ckpts",
    help="List runs and their checkpoints (local and remote); `zoo ckpts download RUN\\[/STEP]` fetches one.",
    invoke_without_command=True,
)


@ckpts_app.callback()
def ckpts(
    ctx: typer.Context,
    match: Annotated[
        str | None, typer.Option("--match", "-m", help="only runs whose name matches this glob")
    ] = None,
    remote: Annotated[bool, typer.Option("--remote", help="only remote runs, live from the Volume")] = False,
    local: Annotated[
        bool, typer.Option("--local", help="only local runs (and synced copies of remote ones)")
    ] = False,
    outputs: OutputsOption = Path("outputs"),
    volume: VolumeOption = DEFAULT_VOLUME,
    volume_dir: VolumeDirOption = None,
    stall_after: StallOption = "15m",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Runs, their checkpoints, step, size, age and key metric, and where they are."""
    if ctx.invoked_subcommand is not None:
        return
    if remote and local:
        raise fail("--remote and --local exclude each other; give neither to see both", 2)
    stall = duration_or_exit(stall_after, "--stall-after")
    now = time.time()
    # Remote runs live from the Volume when asked for, or by default when Modal is configured;
    # otherwise the copies the last `zoo sync` made stand in for them.
    asked = remote or volume_dir is not None
    no_token = None if local or asked else token_problem()
    live_remote = asked or (not local and no_token is None)
    if no_token is not None:  # say what the listing leaves out, as when Modal does not answer
        err_console.print(
            f"[yellow]remote runs not listed:[/] {no_token}; showing synced copies",
            highlight=False,
            soft_wrap=True,
        )
    infos: list[RunInfo] = []
    if not remote:
        infos += list_local_runs(outputs, now, stall, include_mirrors=not live_remote)
    if live_remote:
        try:
            store = open_remote_store(volume, volume_dir)
        except (ModalUnavailable, StoreError) as exc:
            if remote or volume_dir is not None:
                raise fail(str(exc), 1) from None
            err_console.print(
                f"[yellow]remote runs not listed:[/] {exc}; showing synced copies",
                highlight=False,
                soft_wrap=True,
            )
            infos += [i for i in list_local_runs(outputs, now, stall) if i.where != "local"]
        else:
            infos += list_store_runs(store, now, stall)
    if match is not None:
        from fnmatch import fnmatchcase

        infos = [i for i in infos if fnmatchcase(i.name, match)]
    if as_json:
        console.print_json(json.dumps([run_record(i, now) for i in infos]))
        return
    if not infos:
        console.print(f"no runs in {outputs}" + ("" if not live_remote else " or on the remote store"))
        return
    print_table(checkpoints_table(infos, now))
    # What the table's status cannot say: why a run is dead and how to continue it.
    for info in infos:
        if info.status.state == "dead":
            console.print(f"{info.name} is dead: {info.status.detail}", highlight=False, markup=False)


@ckpts_app.command("download")
def download(
    spec: Annotated[str, typer.Argument(help="RUN (its last.pt) or RUN/STEP, e.g. cifar10-x/20000")],
    dest: Annotated[
        Path | None, typer.Option("--dest", help="file to write (default: OUTPUTS/RUN@remote/NAME)")
    ] = None,
    outputs: OutputsOption = Path("outputs"),
    volume: VolumeOption = DEFAULT_VOLUME,
    volume_dir: VolumeDirOption = None,
) -> None:
    """Fetch one remote checkpoint, verified by size, sha256 sidecar (if any) and loading it."""
    try:
        run, name = parse_checkpoint_spec(spec)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    target = dest or outputs / mirror_name(run) / name
    with user_errors():  # before the transfer, which may be gigabytes
        check_writable_file(target, "--dest")
        check_writable_file(target.with_name(f"{target.name}.sha256"), "--dest")
    store = remote_store_or_exit(volume, volume_dir)
    folder = f"{OUTPUTS}/{run}"
    try:
        entry = resolve_checkpoint(store, folder, name)
        with byte_progress() as progress:
            task = progress.add_task(f"{run}/{name}", total=entry.size)
            result = download_checkpoint(
                store,
                folder,
                name,
                run,
                target,
                on_bytes=lambda n: progress.advance(task, n),
                on_restart=lambda: progress.reset(task),
            )
    except DownloadError as exc:
        raise fail(str(exc), 1) from None
    console.print(
        f"{result.path}  step {result.step}, {format_bytes(result.size)}, "
        f"sha256 {result.sha256[:16]}… (verified)",
        highlight=False,
    )


def print_clean_plan(plan: CleanPlan, where: str, deleting: bool) -> None:
    if plan.deletions:
        table = Table(title=f"{'deleting' if deleting else 'would delete'} ({where})")
        table.add_column("run", overflow="fold")
        table.add_column("file", overflow="fold")
        table.add_column("size", justify="right")
        table.add_column("why")
        for deletion in plan.deletions:
            table.add_row(
                deletion.run, Path(deletion.path).name, format_bytes(deletion.size), deletion.reason
            )
        print_table(table)
    for run, reason in plan.skipped:
        console.print(f"[yellow]skipping {run}:[/] {reason}", highlight=False)
    console.print(
        f"{len(plan.runs_matched)} run(s) matched; {len(plan.deletions)} file(s), "
        f"{format_bytes(plan.total_bytes)} to free. last.pt is always kept.",
        highlight=False,
    )


def clean(
    pattern: Annotated[str | None, typer.Argument(help="glob of run names, e.g. 'cifar10-*'")] = None,
    keep_last: Annotated[
        int, typer.Option("--keep-last", min=0, help="archived checkpoints to keep per run (newest)")
    ] = 0,
    remote: Annotated[
        bool, typer.Option("--remote", help="clean remote runs on the Volume instead of local ones")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="really delete (without it: only list)")] = False,
    all_runs: Annotated[bool, typer.Option("--all", help="allow a pattern that selects every run")] = False,
    live_window: Annotated[
        str, typer.Option("--live-window", help="runs written to within this time are left alone")
    ] = "15m",
    outputs: OutputsOption = Path("outputs"),
    volume: VolumeOption = DEFAULT_VOLUME,
    volume_dir: VolumeDirOption = None,
) -> None:
    """List old checkpoints that can go, and the space they free; delete them with --yes."""
    try:
        pattern = check_pattern(pattern, all_runs)
    except CleanError as exc:
        raise fail(str(exc), 2) from None
    window = duration_or_exit(live_window, "--live-window")
    if remote:
        store, prefix = remote_store_or_exit(volume, volume_dir), OUTPUTS
    else:
        if not outputs.is_dir():  # otherwise "0 run(s) matched" hides a mistyped folder
            raise fail(
                f"--outputs {outputs} is not a folder: "
                "give the folder holding the run folders (default outputs)",
                2,
            )
        store, prefix = LocalDirStore(outputs), ""
    try:
        plan = plan_clean(store, prefix, pattern, keep_last, live_window=window, allow_all=all_runs)
    except CleanError as exc:
        raise fail(str(exc), 2) from None
    print_clean_plan(plan, store.describe(), deleting=yes)
    if not plan.deletions:
        return
    if not yes:
        console.print("dry run: nothing deleted. Pass --yes to delete the files listed above.")
        return
    result = execute_clean(store, plan, prefix, live_window=window)
    for run, reason in result.skipped:
        console.print(f"[yellow]kept {run}:[/] {reason}", highlight=False)
    console.print(
        f"deleted {len(result.deleted)} file(s), freed {format_bytes(result.freed_bytes)}", highlight=False
    )


def register(app: typer.Typer) -> None:
    """Add `sync`, `ckpts` and `clean` to the `zoo` app."""
    app.command("sync", help="Pull remote runs' small files and trackio data into the local store.")(sync)
    app.add_typer(ckpts_app, name="ckpts")
    app.command("clean", help="List old checkpoints that can be deleted; delete them with --yes.")(clean)
