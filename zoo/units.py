"""Sizes as people read them; no torch, so the run-management commands can use it."""


def format_bytes(nbytes: float) -> str:
    """512 B, 640 KiB, 12.34 MiB, 1.50 GiB: binary units, readable for the tiny memory caps tests use
    as well as for a GPU's memory or a checkpoint."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    if nbytes >= 2**10:
        return f"{nbytes / 2**10:.0f} KiB"
    return f"{nbytes:.0f} B"
