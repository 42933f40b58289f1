import os
from pathlib import Path

import pytest
import torch

# One thread: the tests use small models, where OpenMP overhead and contention with other
# processes on a 2-core machine cost far more than a second thread gains.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_trackio(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test logs into its own trackio store, never the user's."""
    store = tmp_path_factory.mktemp("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    for key in [k for k in os.environ if k.startswith("ZOO_")]:
        monkeypatch.delenv(key)
    return store
