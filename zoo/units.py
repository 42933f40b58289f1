"""Sizes and measurements as people read them; no torch, so the run-management commands can use it."""

import math


def format_bytes(nbytes: float) -> str:
    """512 B, 640 KiB, 12.34 MiB, 1.50 GiB: binary units, readable for the tiny memory caps tests use
    as well as for a GPU's memory or a checkpoint."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    if nbytes >= 2**10:
        return f"{nbytes / 2**10:.0f} KiB"
    return f"{nbytes:.0f} B"


def format_estimate(value: float, stderr: float) -> str:
    """value ± s.e., both to the s.e.'s second significant digit: 0.0271 ± 0.0092, 12.3 ± 1.4."""
    digits = max(0, 1 - math.floor(math.log10(stderr))) if stderr > 0 else 4
    return f"{value:.{digits}f} ± {stderr:.{digits}f}"
