"""Checks of parameter values shared by the parameter objects: one message per kind of mistake.

Each check raises :class:`ValueError` naming the parameter and the value, so a bad value is refused where the
object is built, before any work starts.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable

__all__ = ["FITS_SUFFIXES", "check_choice", "check_count", "check_output_fits", "check_positive_finite"]


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


#: File name endings of a FITS file photref writes.
FITS_SUFFIXES = (".fits", ".fit", ".fts")


def check_output_fits(what: str, path) -> str:
    """The absolute path of a FITS file to write, checked before any work: a ``.fits`` name, not a
    directory, in a directory that exists (or can be made) and can be written.

    Parameters
    ----------
    what : str
        What the file is, for the message (``"--model-output"``).
    path : str or os.PathLike

    Returns
    -------
    str

    Raises
    ------
    BadInputError
        Naming the path and the problem.
    """
    from .errors import BadInputError

    full = os.path.abspath(os.fspath(path))
    if os.path.isdir(full):
        raise BadInputError(full, f"{what} is a directory; give a FITS file name")
    if not full.lower().endswith(FITS_SUFFIXES):
        raise BadInputError(full, f"{what} must be a FITS file name ending in {' or '.join(FITS_SUFFIXES)}")
    parent = os.path.dirname(full)
    while not os.path.exists(parent):  # the nearest existing directory is where the new ones would go
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BadInputError(full, f"{what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(full, f"{what}: cannot write in {parent} (permission denied)")
    return full
