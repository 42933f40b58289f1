"""Where things live: on the Modal Volume and in the local store.

Volume (mounted at /vol in the container; paths below are relative to the volume root):

    outputs/<run>/...                 run folders, exactly as `zoo train` writes them locally
    trackio/<run>/<project>.db        trackio data of one run, and its media/ (a consistent copy the
                                      container makes of its local TRACKIO_DIR; one folder per run
                                      because two runs writing one file would overwrite each other)
    data/                             datasets (data.root=/vol/data for every remote run)
    remote/<run>/submission.json      what `zoo modal submit` asked for (written by the client only)
    remote/<run>/attempts.jsonl       one line per container attempt (written by the container only)
    remote/<run>/failure-rank<k>.json why an attempt's training process failed (container only)
    remote/<run>/torchrun-failures.json how each failed torchrun process ended: exit code, signal
    remote/<run>/train.log            the training output of every attempt (container only)
    remote/<run>/stopped.json         written by `zoo modal stop`
    attempts/<run>/<time>/            an earlier attempt's partial run folder and trackio data
                                      (it crashed before its first checkpoint), kept for diagnosis

Every file has one writer, so Volume's "last write wins" never loses anything.

Local store:

    <outputs>/<run>/                  local runs (`zoo train`)
    <outputs>/<run>@remote/           mirror of a remote run's small files (`zoo sync`) and any
                                      checkpoint fetched with `zoo ckpts download`
    $TRACKIO_DIR/<project>.db         local trackio runs and remote runs as `<run>@remote`

Run names match `[A-Za-z0-9][A-Za-z0-9._-]*` (the config schema), so `@` never occurs in a local
run's name: a mirror can never overwrite a local run, even one with the same name.
"""

import re
from pathlib import PurePosixPath

DEFAULT_VOLUME = "zoo-runs"  # the Modal Volume's name unless --volume says otherwise
VOLUME_MOUNT = PurePosixPath("/vol")
OUTPUTS = "outputs"
TRACKIO = "trackio"
DATA = "data"
REGISTRY = "remote"
ATTEMPTS = "attempts"

REMOTE_SUFFIX = "@remote"
MIRROR_MANIFEST = ".zoo-remote.json"

RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CHECKPOINT_SUFFIX = ".pt"


def mirror_name(run: str) -> str:
    """The local name of remote run `run` (folder under outputs/, trackio run name)."""
    return f"{run}{REMOTE_SUFFIX}"


def is_mirror(name: str) -> bool:
    return name.endswith(REMOTE_SUFFIX)


def remote_run_of(name: str) -> str:
    return name.removesuffix(REMOTE_SUFFIX)


def volume_path(*parts: str) -> str:
    """A path inside the volume, relative to its root ('outputs/run/last.pt')."""
    return str(PurePosixPath(*parts))


def mounted_path(*parts: str) -> PurePosixPath:
    """The same path as the container sees it (/vol/outputs/run/last.pt)."""
    return VOLUME_MOUNT.joinpath(*parts)


def is_transient_file(name: str) -> bool:
    """Temporary files of atomic writes (`.last.pt.tmp-123`, trackio's `x.tmp`): never synced or listed."""
    return name.startswith(".") or ".tmp" in name


def check_run_name(name: str) -> str:
    if not RUN_NAME_PATTERN.match(name):
        raise ValueError(
            f"run name {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 100 characters)"
        )
    return name
