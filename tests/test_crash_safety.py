"""A checkpoint write killed inside each of its phases, or failed by a full disk, never bricks a run.

save_checkpoint writes the file through a synced temporary file renamed into place, then its
`.sha256` sidecar the same way.  A child process (fork: no second torch import) is killed with
os._exit at one phase of that sequence, as SIGKILL would, with no cleanup; the parent then loads
the checkpoint (at once: no wait on the dead writer's temporary file) and cleans the folder.
"""

import errno
import os
import time
from pathlib import Path

import pytest
import torch

from zoo.checkpoint_files import checksum_path
from zoo.checkpoints import load_checkpoint, save_checkpoint
from zoo.remote.clean import execute_clean, plan_clean
from zoo.remote.store import LocalDirStore
from zoo.runs import RunDir

KILLED = 9


def kill_at(phase: str) -> None:
    """In the child: make the next save end the process at `phase` of its write sequence."""
    real_replace, real_fsync = os.replace, os.fsync
    renames = []

    def fsync(fd: int) -> None:
        if phase == "writing" and not renames:  # the checkpoint's bytes, half of them on disk
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os._exit(KILLED)
        real_fsync(fd)

    def replace(src, dst) -> None:
        renames.append(dst)
        checkpoint, sidecar = len(renames) == 1, len(renames) == 2
        if (phase == "written" and checkpoint) or (phase == "checksum written" and sidecar):
            os._exit(KILLED)  # a whole, synced temporary file that was never renamed
        real_replace(src, dst)
        if (phase == "renamed" and checkpoint) or (phase == "done" and sidecar):
            os._exit(KILLED)

    os.fsync, os.replace = fsync, replace


def save_killed_at(path: Path, payload: dict, phase: str) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            kill_at(phase)
            save_checkpoint(path, payload)
        finally:
            os._exit(1)  # the phase was never reached
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED, f"the save was not killed at {phase!r}"


# phase of the kill -> the step last.pt holds after it (10: the previous save's, 20: the new one)
PHASES = {"writing": 10, "written": 10, "renamed": 20, "checksum written": 20, "done": 20}


@pytest.mark.parametrize("phase", PHASES)
def test_a_save_killed_in_each_phase_leaves_a_loadable_checkpoint(tmp_path, phase):
    run = RunDir(tmp_path / "outputs" / "k")
    weights = torch.randn(256)
    save_checkpoint(run.last, {"run_name": "k", "step": 10, "model": {"w": weights}})
    save_killed_at(run.last, {"run_name": "k", "step": 20, "model": {"w": -weights}}, phase)

    started = time.monotonic()
    loaded = load_checkpoint(run.last)
    assert time.monotonic() - started < 2, "a dead writer's temporary file is no save to wait for"
    assert loaded["step"] == PHASES[phase]
    assert torch.equal(loaded["model"]["w"], weights if PHASES[phase] == 10 else -weights)
    leftovers = sorted(p.name for p in run.root.glob(".*.tmp-*"))
    assert bool(leftovers) == (phase in ("writing", "written", "checksum written")), leftovers

    # `zoo clean --yes` removes the dead writer's temporary files, never a complete checkpoint.
    store = LocalDirStore(run.root.parent)
    plan = plan_clean(store, "", "k", keep_last=0, now=time.time() + 3600, live_window=1)
    assert sorted(Path(d.path).name for d in plan.deletions) == leftovers
    execute_clean(store, plan, "", now=time.time() + 3600, live_window=1)
    assert load_checkpoint(run.last)["step"] == PHASES[phase]
    # The next save puts it right: the file and its sidecar agree again.
    save_checkpoint(run.last, {"run_name": "k", "step": 30, "model": {"w": weights}})
    assert load_checkpoint(run.last)["step"] == 30 and checksum_path(run.last).read_text().endswith(
        " last.pt\n"
    )


class DiskFull:
    """open() for a checkpoint's temporary file whose write stops half-way with ENOSPC."""

    def __init__(self, real_open):
        self.real_open = real_open

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        if ".pt.tmp-" not in str(file):
            return handle
        real_write = handle.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handle.write = write
        return handle


def test_a_full_disk_leaves_no_partial_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import zoo.runs
    from zoo.errors import CheckpointError

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 10, "model": {"w": torch.ones(100)}})
    monkeypatch.setattr(zoo.runs, "open", DiskFull(open), raising=False)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(path, {"step": 20, "model": {"w": torch.zeros(100)}})
    message = str(error.value)
    assert message.startswith(f"could not write checkpoint {path}: No space left on device")
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 10


def test_a_folder_that_cannot_be_fsynced_still_takes_the_write(tmp_path, monkeypatch):
    """Network and FUSE filesystems may refuse a folder fsync after the rename: the file is in
    place, so the write must stand; any other error still fails it."""
    from zoo import runs

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "file.bin"
    runs.atomic_write_bytes(target, b"payload")
    assert target.read_bytes() == b"payload"

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        runs.atomic_write_bytes(tmp_path / "other.bin", b"x")
