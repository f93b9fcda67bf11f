"""Errors raised by photref_core.

Every error about bad input names the offending file (or expression) and the problem, so a survey
operator can find and fix it without reading a traceback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

__all__ = [
    "BadInputError",
    "FitError",
    "FitTermsError",
    "PhotrefError",
    "StoreError",
    "is_transient",
    "retry_transient",
]


class PhotrefError(Exception):
    """Base class of every photref error."""


class BadInputError(PhotrefError):
    """An input file (frame, catalog, image) cannot be used.

    Parameters
    ----------
    path : str or os.PathLike or None
        The offending file; ``None`` when the input did not come from a file.
    problem : str
        What is wrong, in words an operator understands.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        # Keep the error picklable (dask workers, Prefect results).
        return (type(self), (self.path, self.problem))


class FitTermsError(PhotrefError):
    """A fit-terms expression is malformed, names something unknown, or is not allowed."""


class FitError(PhotrefError):
    """A fit cannot be done (e.g. fewer usable stars than terms)."""


class StoreError(PhotrefError):
    """A store cannot be used (wrong schema version, inconsistent layout, locked by another run)."""


def is_transient(exc: BaseException) -> bool:
    """Whether an error is a transient I/O failure worth retrying (not a bad file).

    An ``OSError`` carrying an errno (EIO, ETIMEDOUT, ESTALE on a network file system, ...) is transient;
    a missing file, a permission problem, or astropy's "corrupt FITS" (an OSError without errno) is not.
    """
    return (
        isinstance(exc, OSError)
        and exc.errno is not None
        and not isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError)
    )


def retry_transient(read, path, delays: Sequence[float] = (0.05, 0.5, 2.0)):
    """``read(path)``, retried after each delay while it fails with a transient I/O error.

    A writer task reads many frames: retrying the one read that failed is cheaper and far more robust
    than failing (and retrying) the whole task; Prefect's task retries remain the second line.
    """
    for delay in delays:
        try:
            return read(path)
        except OSError as exc:
            if not is_transient(exc):
                raise
            time.sleep(delay)
    return read(path)
