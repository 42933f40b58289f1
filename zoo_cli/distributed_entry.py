"""What each torchrun process runs for `zoo train --nproc N`: the same train_run as one process."""

import json
import sys
from pathlib import Path

from zoo.config.loading import config_from_dict
from zoo.devices import resolve_device
from zoo.training import distributed
from zoo.training.trainer import train_run


def main() -> None:
    config_path, mode = sys.argv[1], sys.argv[2]
    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    # The run's device decides the backend (gloo for --device cpu even on a GPU machine).
    distributed.init(device_type=resolve_device(cfg.device).type)
    try:
        train_run(cfg, resume=mode == "--resume", command=f"zoo train --nproc {distributed.world_size()}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
