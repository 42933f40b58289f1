"""Sample-quality metrics: energy distance (any data, exact, with standard error) and FID."""

from zoo.metrics.energy import EnergyDistance, energy_distance
from zoo.metrics.fid import FidUnavailableError, compute_fid, feature_statistics, frechet_distance

__all__ = [
    "EnergyDistance",
    "FidUnavailableError",
    "compute_fid",
    "energy_distance",
    "feature_statistics",
    "frechet_distance",
]
