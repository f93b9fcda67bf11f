"""Checks of parameter values shared by the parameter objects: one message per kind of mistake.

Each check raises :class:`ValueError` naming the parameter and the value, so a bad value is refused where the
object is built, before any work starts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

__all__ = ["check_choice", "check_count", "check_positive_finite"]


def check_positive_finite(name: str, value) -> float:
    """``value`` as a float when it is a real, finite number > 0 (not a bool).

    Raises
    ------
    ValueError
        Otherwise, naming ``name``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_count(name: str, value) -> int:
    """``value`` as an int when it is an integer >= 0 (not a bool).

    Raises
    ------
    ValueError
        Otherwise, naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``.

    Raises
    ------
    ValueError
        Otherwise, naming ``name`` and the choices.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
