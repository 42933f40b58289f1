"""Run folders: every run has a name and keeps all it writes under `<output_dir>/<run_name>/`.

    last.pt               newest checkpoint (refreshed every `train.save_every` steps)
    step_0001000.pt       archived checkpoints (7-digit step)
    config.toml           the resolved configuration
    metrics.jsonl         one JSON object per logged step (train/..., eval/...)
    heartbeat.json        status, step, last loss, last checkpoint, updated time
    eval.json             the last evaluation table
    samples/              sample grids / scatter plots
    loss.png              the training loss curve (refreshed at every checkpoint)

Beside the folder, `<output_dir>/.<run_name>.lock` is locked by the one process training the run
(see RunLock): taken before the folder is first written, so that it can refuse a second start
without writing anything into the folder.

Small text files are written atomically (temporary file, then rename) so a reader — `zoo ckpts`,
`zoo sync`, a crash — never sees half of one.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.environment import SUBMISSION_ENV
from zoo.output_paths import check_writable_dir

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})\.pt$")
# "interrupted": stopped by SIGINT/SIGTERM/SIGHUP, after saving what it could; `--resume` continues it.
HEARTBEAT_STATUSES = ("running", "finished", "failed", "interrupted")


class RunError(RuntimeError):
    """A run folder that cannot be used as asked (collision, missing run to resume, ...)."""


class RunBusyError(RunError):
    """Another process is training the run: the request conflicts with it (the user's to change)."""


class DivergedError(RunError):
    """Training produced a non-finite loss, gradient or weight; stopped before saving it."""


class CheckpointReplacedError(RunError):
    """The checkpoint a resume read was replaced before the resume took the run (another process
    trained it meanwhile, on a filesystem without locks): a race, not the command's fault."""


class MemoryLimitError(RunError):
    """The configured batch cannot be trained within the memory limit: a config to change (batch
    size, micro-batching or the limit), reported before any run folder exists."""


class RunNotFoundError(RunError):
    """`--resume` names a run with no checkpoint: the command, not the run, must change."""


class RunInterrupted(BaseException):
    """Training stopped on SIGINT, SIGTERM or SIGHUP; the message says where, and how to resume.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` takes it for an error.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held: a temporary file, synced, renamed into place.

    A failed write (a full disk) removes its temporary file; a killed one leaves it, named after
    its process (`.NAME.tmp-PID`), for `zoo clean` to remove.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a power cut after it cannot undo it).

    Some network and FUSE filesystems cannot open or fsync a folder (EINVAL, ENOTSUP, EBADF,
    EACCES); the rename has already happened there, so the write stands, as SQLite treats it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in FOLDER_SYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in FOLDER_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES}


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    def archive(self, step: int) -> Path:
        return self.root / f"step_{step:07d}.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def heartbeat(self) -> Path:
        return self.root / "heartbeat.json"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss.png"

    def archived_checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.root.glob("step_*.pt"):
            match = CHECKPOINT_PATTERN.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def append_metrics(self, record: dict[str, Any]) -> None:
        # One line per write: appends of a single short line are atomic enough for readers
        # that skip a trailing partial line (read_metrics does).
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl; a line that is no JSON object (one still being written,
        or damaged bytes) is skipped."""
        if not self.metrics.exists():
            return []
        records = [json_object(line) for line in self.metrics.read_bytes().splitlines()]
        return [record for record in records if record is not None]

    def write_heartbeat(self, **fields: Any) -> dict[str, Any]:
        current = self.read_heartbeat() or {"run_name": self.name, "started": time.time()}
        current.update(fields)
        submission = os.environ.get(SUBMISSION_ENV)
        if submission:
            # A remote attempt stamps every heartbeat with its submission, so status can tell an
            # earlier attempt's heartbeat from this one's without comparing two machines' clocks.
            current["submission_id"] = submission
        # Who writes it: `zoo clean` on this host leaves a run alone while that process lives.
        current["pid"], current["host"] = os.getpid(), socket.gethostname()
        current["updated"] = time.time()
        if current.get("status") not in HEARTBEAT_STATUSES:
            raise ValueError(
                f"heartbeat status must be one of {HEARTBEAT_STATUSES}, got {current.get('status')!r}"
            )
        text = json.dumps(current, indent=2, sort_keys=True) + "\n"
        try:
            atomic_write_text(self.heartbeat, text)
        except OSError:
            # A full disk has no room for a second copy: overwrite the small file in place, which
            # frees its blocks first (a reader may catch it half-written and skip it).
            self.heartbeat.write_text(text)
        return current

    def read_heartbeat(self) -> dict[str, Any] | None:
        """The heartbeat, or None when there is none or it is no JSON object (damaged)."""
        if not self.heartbeat.exists():
            return None
        return json_object(self.heartbeat.read_bytes())

    def checkpoint_files(self) -> list[Path]:
        """last.pt and the archived checkpoints that exist."""
        return [path for path in (self.last,) if path.exists()] + [p for _, p in self.archived_checkpoints()]

    def has_content(self) -> bool:
        """Whether the folder holds anything."""
        return self.root.is_dir() and any(self.root.iterdir())


def json_object(data: bytes | str) -> dict[str, Any] | None:
    """`data` parsed as one JSON object, or None when it is not one (half-written, damaged bytes,
    not UTF-8, a list)."""
    try:
        parsed = json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None
    return parsed if isinstance(parsed, dict) else None


# How long acquiring the lock retries: a reader's probe (probe_lock) holds it for microseconds.
LOCK_RETRY_S = 0.5


def lock_path(run: RunDir) -> Path:
    """The run's lock file: beside its folder (a run name never starts with '.', so no run folder
    and no other run's lock has this name), so that taking it writes nothing into the folder."""
    return run.root.parent / f".{run.name}.lock"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class LockProbe:
    """What a run's lock says: `holder`, {"pid", "host", "started"} as the process training the run
    wrote them, while one holds it; `abandoned`, a lock file that no process holds (its holder was
    killed before it could remove it: the lock died with it).  Neither: no lock file, or a
    filesystem without locks, where nothing can be told from it."""

    holder: dict[str, Any] | None = None
    abandoned: bool = False


def probe_lock(folder: Path) -> LockProbe:
    """The lock of the run in `folder` (see LockProbe)."""
    try:
        fd = os.open(lock_path(RunDir(folder)), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return LockProbe()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockProbe(holder=json_object(os.read(fd, 4096)) or {})
        except OSError:  # a filesystem without locks
            return LockProbe()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return LockProbe(abandoned=True)
    finally:
        os.close(fd)


def writer_of(folder: Path) -> dict[str, Any] | None:
    """The process training the run in `folder` (LockProbe.holder); None when none holds its lock."""
    return probe_lock(folder).holder


def writer_gone(folder: Path, heartbeat: dict[str, Any] | None) -> str | None:
    """Why the process a "running" heartbeat names has certainly ended without saying so (killed:
    SIGKILL, out of memory, a power cut), or None when it may live.  Told only on this machine:
    a lock on a shared filesystem may be this machine's alone, and a process id another's."""
    if heartbeat is None or heartbeat.get("status") != "running":
        return None
    if heartbeat.get("host") != socket.gethostname():
        return None
    probe = probe_lock(folder)
    if probe.holder is not None:
        return None
    pid = heartbeat.get("pid")
    known_pid = isinstance(pid, int) and not isinstance(pid, bool)
    if probe.abandoned or (known_pid and not process_alive(pid)):
        return f"process {pid} is gone without a final heartbeat (killed: SIGKILL, out of memory?)"
    return None


def writer_text(holder: dict[str, Any]) -> str:
    pid = holder.get("pid", "?")
    return f"process {pid} on {holder.get('host', 'this machine')}"


NO_LOCKS_WARNING = (
    "warning: {where} has no file locks, so zoo cannot stop a second process from training run "
    "{run!r} at the same time; start each run once"
)


class RunLock:
    """Held by the one process that trains a run, from before it checks the run folder until it
    exits: a second `zoo train` or `--resume` of the run is refused at once (RunBusyError), before
    it builds anything, and `zoo clean` leaves the run alone.  An flock on `lock_path(run)`: the
    kernel releases it when the process ends, however it ends (SIGKILL included), so a lock is never
    stale; a clean exit also removes the file, a killed process leaves it (abandoned, see
    LockProbe).

    On a filesystem without locks the run goes unlocked, and one line on stderr says so.  A remote
    run on the Modal Volume (no locks across containers) is kept to one writer by its submission
    record instead, so no line is said there: a new name is refused if the Volume has it, `--resume`
    is refused while the heartbeat is live and otherwise cancels the previous call and waits out
    its shutdown grace (what is left of it after a recent `zoo modal stop`) before the new
    container starts (zoo.remote.submission), and an attempt
    refuses a run whose record names another submission (zoo.remote.worker).
    """

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.path = lock_path(run)
        self.fd: int | None = None
        # The folders created to hold the lock file, innermost first: removed on exit if still
        # empty, so that a start refused later leaves no trace.
        self.created: list[Path] = []

    def __enter__(self) -> "RunLock":
        folder = self.path.parent.absolute()
        while not folder.exists():
            self.created.append(folder)
            folder = folder.parent
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, made = open_or_create(self.path)
            except FileNotFoundError:  # another start removed the file or the empty folder meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.05)
                    continue
                holder = json_object(os.read(fd, 4096)) or {}
                os.close(fd)
                self.remove_created_folders()
                raise RunBusyError(busy_message(self.run, holder)) from None
            except OSError:
                # A file that locks nothing: removed if this open made it, but one that was there
                # may be the lock of a holder on a host where locks work, so it stays.
                if made and same_file(fd, self.path):
                    self.path.unlink(missing_ok=True)
                os.close(fd)
                if not os.environ.get(SUBMISSION_ENV):
                    print(NO_LOCKS_WARNING.format(where=self.path.parent, run=self.run.name), file=sys.stderr)
                return self
            if same_file(fd, self.path):
                break
            # Its previous holder removed the file between our open and our lock: lock the new one.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(),
        )
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            # Removed while still held: whoever opened it meanwhile sees it is gone once it locks.
            # Only if the path still names the held file: a file put there since (after a user's
            # rm) may be the lock of another holder, whose removal would let a third writer in.
            if same_file(self.fd, self.path):
                self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
        self.remove_created_folders()

    def remove_created_folders(self) -> None:
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty (the run was written, or another run's lock is there)
                break
        self.created.clear()


def open_or_create(path: Path) -> tuple[int, bool]:
    """`path` opened for reading and writing, created if absent, and whether this open created it."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR), False


def same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def busy_message(run: RunDir, holder: dict[str, Any]) -> str:
    pid = holder.get("pid")
    stop = f" or stop it (kill {pid})" if pid else ""
    return (
        f"run {run.name!r} is being trained by {writer_text(holder)}; one process writes a run: "
        f"wait for it to end{stop}, then try again"
    )


def prepare_run_folder(run: RunDir, resume: bool, restart: bool = False) -> None:
    """Create the run folder to write (the caller holds its RunLock); a new run's folder must be
    empty (`restart`: it is emptied)."""
    if not resume and run.has_content():
        if not restart:
            # Created by a process that could not take the lock (a filesystem without locks).
            raise RunError(f"run {run.name!r} was created at {run.root} meanwhile; choose another --run-name")
        check_restartable(run)
        for child in run.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    run.root.mkdir(parents=True, exist_ok=True)


def check_restartable(run: RunDir) -> None:
    found = run.checkpoint_files()
    if found:
        names = ", ".join(p.name for p in found[:3])
        raise RunError(
            f"--restart starts afresh only a run without checkpoints, and {run.name!r} has {names}: "
            "continue it with --resume, or choose another --run-name"
        )


def default_run_name(preset: str | None) -> str:
    return f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run(
    output_dir: str | Path,
    run_name: str,
    resume: bool,
    restart: bool = False,
    lock: contextlib.ExitStack | None = None,
    rank0: bool = True,
) -> RunDir:
    """The folder of a new run, or of the run to resume; never another run's folder, nor one that
    another process is training.  `restart`: a folder without checkpoints (a run stopped before its
    first save) may be started afresh.

    `lock`: take the run's RunLock into it first (the process that will train the run), so that
    a second start is refused here, not after minutes of building.  Without it the check only
    asks whether a process holds the lock.  `rank0` False: another process of a distributed run,
    which leaves the lock to rank 0.

    The folder itself is not created: the caller creates it once everything that can fail on bad
    input has been built, so a refused start writes nothing into it.
    """
    check_writable_dir(output_dir, "output_dir")
    run = RunDir(Path(output_dir) / run_name)
    check_writable_dir(run.root, "--run-name")
    if lock is not None and rank0:
        lock.enter_context(RunLock(run))
    elif rank0:
        holder = writer_of(run.root)
        if holder is not None:
            raise RunBusyError(busy_message(run, holder))
    empty_run = run.has_content() and not run.checkpoint_files()
    if resume:
        if not run.last.exists():
            afresh = (
                " It holds no checkpoint (it stopped before its first save): start it afresh with --restart"
                if empty_run
                else ""
            )
            raise RunNotFoundError(
                f"cannot resume run {run_name!r}: no checkpoint at {run.last}. "
                f"Check --run-name (zoo ckpts lists runs) or start it without --resume.{afresh}"
            )
        return run
    if restart and run.has_content():
        check_restartable(run)
        return run
    if empty_run:
        raise RunError(
            f"run {run_name!r} already exists at {run.root} but holds no checkpoint (it stopped before "
            "its first save); pass --restart to start it afresh, or choose another --run-name"
        )
    if run.has_content():
        raise RunError(
            f"run {run_name!r} already exists at {run.root}; pass --resume to continue it, "
            f"choose another --run-name, or delete it first (rm -r {shlex.quote(str(run.root))})"
        )
    return run


def check_checkpoint_owner(run: RunDir, owner: str) -> None:
    """A run resumes only from its own checkpoints: a copied or renamed folder holds another run's."""
    if owner != run.name:
        raise RunError(
            f"{run.last} belongs to run {owner!r}, not {run.name!r} (was the folder copied or renamed?); "
            f"a run resumes only from its own checkpoints: continue {owner!r} with --run-name {owner} "
            f"in its own folder, or start a new run under another --run-name"
        )
