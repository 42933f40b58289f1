"""The `ZOO_` environment variables that are not configuration keys.

Every other `ZOO_` variable sets a configuration key (`ZOO_SEED=3`, `ZOO_TRAIN__STEPS=100`), and
one that names no key is refused like a misspelt key in a preset: a setting that is silently
ignored is worse than an error.  So each variable zoo reads for itself is listed here, once.
"""

CONFIG_ENV_PREFIX = "ZOO_"

# Where zoo keeps what it computes once and reuses (zoo.output_paths.zoo_cache_dir).
CACHE_DIR_ENV = "ZOO_CACHE_DIR"
# Set by the remote supervisor (zoo.remote.worker) for its training process: the submission
# whose attempt writes this run's heartbeats.
SUBMISSION_ENV = "ZOO_SUBMISSION_ID"
# Where scripts/test_with_torch.sh keeps its virtual environments of other torch versions.
TORCH_VENVS_ENV = "ZOO_TORCH_VENVS"

NON_CONFIG_ENV: tuple[str, ...] = (CACHE_DIR_ENV, SUBMISSION_ENV, TORCH_VENVS_ENV)
