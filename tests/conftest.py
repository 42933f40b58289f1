import os
import tempfile
from pathlib import Path

import pytest
import torch

# One thread: the tests use small models, where OpenMP overhead and contention with other
# processes on a 2-core machine cost far more than a second thread gains.
torch.set_num_threads(1)
# ... and in every process the tests start (`zoo train` subprocesses, supervisors, ranks): with
# two OpenMP threads a tiny model's step waits for a descheduled thread, several times slower.
os.environ["OMP_NUM_THREADS"] = "1"

# trackio reads TRACKIO_DIR once, when it is first imported: one store for the whole session,
# set before any test imports it, so no test ever logs into the user's store.
SESSION_TRACKIO_DIR = Path(tempfile.mkdtemp(prefix="zoo-tests-trackio-"))
os.environ["TRACKIO_DIR"] = str(SESSION_TRACKIO_DIR)


@pytest.fixture(autouse=True)
def isolated_trackio(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's trackio store (subprocesses inherit it), and no stray ZOO_ settings."""
    monkeypatch.setenv("TRACKIO_DIR", str(SESSION_TRACKIO_DIR))
    for key in [k for k in os.environ if k.startswith("ZOO_")]:
        monkeypatch.delenv(key)
    return SESSION_TRACKIO_DIR
