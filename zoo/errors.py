"""Errors a user can act on, raised by the torch-side modules and turned into one line by the CLI.

They live apart from those modules (which import torch) so that the CLI's error handling, and with
it `zoo --help`, `zoo ckpts`, `zoo sync` and `zoo clean`, never has to import torch.
"""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or from an incompatible run."""


class MissingCheckpointError(CheckpointError):
    """No file at the checkpoint path asked for: the path, not the file, must change."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint whose weights hold NaN or inf (saved by a diverged run): nothing to sample."""


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the paths searched and how to get them."""


class DeviceError(RuntimeError):
    """A requested device is unavailable or misnamed."""


class CompileError(RuntimeError):
    """A compiled step (train.compile, bench-jvp --compile) cannot go on compiled."""


class OutputPathError(OSError):
    """A file or folder zoo was asked to write cannot be written there (checked before the work)."""


class FidUnavailableError(RuntimeError):
    """FID cannot be computed here: clean-fid is missing or its files cannot be downloaded."""


class FidUnsupportedError(ValueError):
    """FID was asked of a dataset that has no reference statistics."""


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message names the pip extra."""


class MissingAssetError(FileNotFoundError):
    """A file zoo cannot make itself is missing (pretrained weights, reference statistics); the
    message says what to fetch and where to put it.  Raised before any work is done."""


class MetricInputError(ValueError):
    """A feature-space metric cannot be computed as asked: too few samples (the message names the
    minimum), a dataset without a feature network, or a cached feature network that is damaged,
    from another config or below its accuracy floor (the message says how to rebuild it)."""
