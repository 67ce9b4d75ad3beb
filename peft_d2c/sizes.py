"""Sizes in bytes: parsing `"20MB"` / `"1.5GiB"` storage budgets and printing sizes. Imports nothing of the package."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["format_size", "is_bytes_budget", "parse_size"]

# Decimal units as the Hub shows file sizes (kB = 1000 bytes); binary units with an "i" (KiB = 1024 bytes).
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, argument: str = "storage_budget") -> int:
    """Number of bytes in a size such as `"20MB"`, `"1.5 GiB"`, `"300kB"` or `1048576`.

    Units are case-insensitive: `B`, `kB`/`MB`/`GB`/`TB` (powers of 1000) and `KiB`/`MiB`/`GiB`/`TiB` (powers of
    1024). A bare number is a number of bytes.

    Args:
        value (`str` or `int`): The size.
        argument (`str`, defaults to `"storage_budget"`): Name used in error messages.

    Returns:
        `int`: the size in bytes (rounded down), at least 1.

    Raises:
        ValueError: If the text is not a positive number followed by a known unit.

    Example:
        ```python
        >>> parse_size("20MB"), parse_size("1KiB"), parse_size(512)
        (20000000, 1024, 512)
        ```
    """
    if isinstance(value, bool):
        raise ValueError(f"`{argument}` must be a size such as '20MB' or a fraction in (0, 1], got {value!r}.")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_PATTERN.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            allowed = ["B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]
            raise ValueError(
                f"`{argument}` must be a number followed by one of the units {allowed} (e.g. '20MB'), got {value!r}."
            )
        size = math.floor(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"`{argument}` must be a positive size, got {value!r}.")
    return size


def format_size(num_bytes: int | float) -> str:
    """Human-readable decimal size, e.g. `format_size(20_000_000) == "20.0 MB"`."""
    value = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover


def is_bytes_budget(storage_budget: Any) -> bool:
    """Whether `storage_budget` is a size in bytes (a string, or an int > 1) rather than a fraction."""
    if isinstance(storage_budget, bool) or storage_budget is None:
        return False
    return isinstance(storage_budget, str) or (isinstance(storage_budget, int) and storage_budget > 1)
