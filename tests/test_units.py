"""zoo.units.format_bytes: one binary-unit reading of sizes for memory, checkpoints and listings."""

from zoo.units import format_bytes


def test_sizes_read_in_binary_units_at_every_scale() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1 KiB"
    assert format_bytes(640 * 2**10) == "640 KiB"
    assert format_bytes(12.34 * 2**20) == "12.34 MiB"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"
    assert format_bytes(10**9) == "953.67 MiB"  # a decimal gigabyte is less than a GiB
    assert format_bytes(2 * 2**40) == "2.00 TiB"
