"""Reading the source catalog (SPEC 1.2): ids exact as uint64, numeric columns only."""

from __future__ import annotations

import os

import numpy as np
from astropy.table import Table

from .errors import BadInputError, is_transient
from .ingest.readers import check_fits_file, is_fits, source_ids_of

__all__ = [
    "read_catalog",
]


def read_catalog(path: str | os.PathLike) -> Table:
    """Read a source catalog (SPEC 1.2).

    Parameters
    ----------
    path : str or os.PathLike
        Any table ``Table.read`` opens, with an integer ``source_id`` column and numeric columns.

    Returns
    -------
    astropy.table.Table
        Sorted by ``source_id`` (uint64); only numeric (and boolean) columns are kept, since only they can
        be variables of fit-terms expressions.

    Raises
    ------
    BadInputError
        Unreadable file, no ``source_id``, duplicate ids, or an empty catalog.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BadInputError(path, "catalog file does not exist")
    if os.path.isdir(path):
        raise BadInputError(path, "is a directory, not a catalog file")
    try:
        if is_fits(path):
            check_fits_file(path)
        table = Table.read(path)
    except BadInputError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise  # retried by the caller's task
        raise BadInputError(path, f"cannot read the catalog ({type(exc).__name__}: {exc})") from exc
    if "source_id" not in table.colnames:
        raise BadInputError(path, "catalog has no 'source_id' column")
    if len(table) == 0:
        raise BadInputError(path, "catalog is empty")
    ids = source_ids_of(np.asarray(table["source_id"]), path, where="catalog")
    keep = [c for c in table.colnames if c != "source_id" and np.asarray(table[c]).dtype.kind in "biuf"]
    out = Table()
    out["source_id"] = ids
    for name in keep:
        column = table[name]
        values = column.filled(np.nan) if hasattr(column, "filled") and column.dtype.kind == "f" else column
        out[name] = np.asarray(values)
    out.sort("source_id")
    out.meta["path"] = os.path.abspath(path)
    return out
