import os
from pathlib import Path

import pytest
import torch

# Two cores: more threads than cores only adds contention in the small tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def isolated_trackio(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test logs into its own trackio store, never the user's."""
    store = tmp_path_factory.mktemp("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    for key in [k for k in os.environ if k.startswith("ZOO_")]:
        monkeypatch.delenv(key)
    return store
