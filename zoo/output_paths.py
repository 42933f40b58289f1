"""Checking, before any work starts, that the files and folders a command will write can be written.

A benchmark, an evaluation or a training run that fails only when it saves its result has thrown
the work away; these checks run first and name the option to change.  Nothing is created: the
nearest existing ancestor is probed with a temporary file (os.access is not enough: root passes it
on /proc and on folders of a read-only mount it cannot see through), which is removed at once.
`zoo_cache_dir` is where zoo keeps what it computes once and reuses.
"""

import errno
import os
import tempfile
from pathlib import Path

from zoo.environment import CACHE_DIR_ENV
from zoo.errors import OutputPathError


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(folder: Path) -> str | None:
    """Why a new file cannot be created in `folder` (None if it can)."""
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".zoo-write-check-"):
            pass
    except OSError as exc:
        return f"{folder}: {exc.strerror or errno.errorcode.get(exc.errno, str(exc))}"
    return None


def check_writable_dir(path: Path | str, option: str) -> Path:
    """A folder zoo will create (if missing) and write into; raises OutputPathError naming `option`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(
            f"cannot write into {option} {path}: it is a file, not a folder; choose another {option}"
        )
    reason = _probe(_nearest_existing(path))
    if reason is not None:
        raise OutputPathError(f"cannot write into {option} {path} ({reason}); choose another {option}")
    return path


def check_writable_file(path: Path | str, option: str) -> Path:
    """A file zoo will write (replacing it if it exists); raises OutputPathError naming `option`."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {option} {path}: it is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"cannot write {option} {path}: permission denied; choose another {option}")
    reason = _probe(_nearest_existing(path.parent))
    if reason is not None:
        raise OutputPathError(f"cannot write {option} {path} ({reason}); choose another {option}")
    return path


def zoo_cache_dir() -> Path | None:
    """$ZOO_CACHE_DIR, default ~/.cache/zoo: results computed once and reused (FID reference
    statistics of image folders).

    A $ZOO_CACHE_DIR that cannot be written is the user's to fix (OutputPathError).  Without it,
    a home folder that cannot be written means no cache: None, and the caller computes afresh.
    """
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return check_writable_dir(root, f"${CACHE_DIR_ENV}")
    try:
        default = Path.home() / ".cache" / "zoo"
    except RuntimeError:  # no HOME and no home directory in the password database
        return None
    try:
        return check_writable_dir(default, f"the cache folder (set ${CACHE_DIR_ENV} to choose one)")
    except OutputPathError:
        return None


def no_cache_notice() -> str:
    return (
        f"no writable cache folder (~/.cache/zoo cannot be written and ${CACHE_DIR_ENV} is unset): "
        f"nothing is cached, so it is computed again next time; set ${CACHE_DIR_ENV} to a writable folder"
    )
