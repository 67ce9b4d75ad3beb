"""Checks of user-given settings, each raising an error that names the setting and says what it must be."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    """Refuse `value` unless it is an int (not a bool) >= `minimum` (or None, when `optional`): `TypeError` /
    `ValueError` naming `name`."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def check_choice(name: str, value: Any, allowed: tuple[Any, ...], *, optional: bool = False) -> None:
    """Refuse `value` unless it is one of `allowed` (or None, when `optional`): `ValueError` naming `name` and
    listing them."""
    if value not in allowed and not (optional and value is None):
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def check_fraction(name: str, value: Any, *, include_one: bool = True) -> float:
    """`value` as a float if it is a number in (0, 1] (in (0, 1) when `include_one` is False), else `ValueError`
    naming `name` and the range."""
    in_range = isinstance(value, (int, float)) and (0 < value <= 1 if include_one else 0 < value < 1)
    if isinstance(value, bool) or not in_range:
        interval = "(0, 1]" if include_one else "(0, 1)"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    return float(value)
