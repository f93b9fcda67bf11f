"""Errors raised by photref_core.

Every error about bad input names the offending file (or expression) and the problem, so a survey
operator can find and fix it without reading a traceback.
"""

from __future__ import annotations

import os


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
