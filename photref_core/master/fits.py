"""Writers (and a reader) for the master photometric reference and the statistics table.

The master photometric reference is a FITS file laid out as SPEC section 5 says, readable by AutoWISP's
``autowisp.magnitude_fitting.util.get_master_photref`` (v2.3.0):

* HDU 0: no data; header = ``extra_header`` followed by FITTERMS, MINOBSFR, OUTL_AVG, OUTL_THR, MAXREJIT,
  STATTHR, STATITER, STATCEN, STATUNIT, SCATQTY, NFRAMES, SOFTWARE, STORE (long strings use the FITS
  ``CONTINUE`` convention, so a long fit-terms expression or store URL survives intact).
* HDU 1..P: binary tables, EXTNAME ``MPHOTREF``, EXTVER p+1, one row per star in the master for photometry
  p, sorted by ``source_id`` (as unsigned 64-bit integers). ``source_id`` is FITS ``K`` with
  ``TZERO = 2**63`` (unsigned 64-bit, as AutoWISP writes it), so every id up to 2**64-1 survives exactly;
  it never passes through a float. ``full_count``, ``rejected_count`` are ``K``; ``magnitude``,
  ``mediandev``, ``medianmeddev``, ``scatter_excess`` and ``mag_err`` (the rejected centre of the errors)
  are ``D``.
* Last HDU ``INMASTER``: one row per frame, ``frame_id``, ``path`` (absolute), ``included``.

Every file is written to a temporary name in the destination directory, flushed to disk and renamed over
the destination (``os.replace``), so a reader sees either the old file or the complete new one, never a
partial one; on any failure the temporary file is removed and an existing file is left untouched.

Text in table columns (frame ids, paths, catalog strings) is stored as UTF-8 bytes (FITS ``A`` columns);
:func:`read_master` decodes it. Header string values that are not ASCII (FITS headers must be) are written
with backslash escapes.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.table import Column, MaskedColumn, Table

from .. import SOFTWARE
from .._atomic import atomic_writeto
from ..errors import BadInputError, PhotrefError
from .parameters import MasterParameters
from .stats import STATISTIC_NAMES

if TYPE_CHECKING:  # xarray (and pandas under it) costs ~0.35 s to import: only where it is used
    import xarray as xr

__all__ = [
    "HEADER_KEYS",
    "MASTER_EXTNAME",
    "FRAMES_EXTNAME",
    "STATISTICS_EXTNAME",
    "STAT_VECTOR_COLUMNS",
    "read_master",
    "statistics_table",
    "write_master",
    "write_statistics_table",
]

MASTER_EXTNAME = "MPHOTREF"
"""EXTNAME of the per-photometry master tables (EXTVER = photometry index + 1)."""

FRAMES_EXTNAME = "INMASTER"
"""EXTNAME of the last HDU of the master: the frames and whether each was used."""

STATISTICS_EXTNAME = "STATISTICS"
"""EXTNAME of the table HDU of the statistics file."""

HEADER_KEYS: dict[str, str] = {
    **{keyword: comment for keyword, (_, comment) in MasterParameters.fits_keywords().items()},
    "NFRAMES": "number of frames included",
    "SOFTWARE": "software (name and version) that wrote this",
    "STORE": "store the statistics were computed from",
}
"""The primary-header keywords of the master, in the order written, with their comments."""

STAT_VECTOR_COLUMNS: tuple[str, ...] = (*STATISTIC_NAMES, "enough", "scatter_excess", "in_master")
"""The (source, photometry) variables of the statistics, in statistics-table column order."""

_COUNT_COLUMNS = frozenset({"full_count", "rejected_count", "mag_err_full_count", "mag_err_rejected_count"})
_BOOL_COLUMNS = frozenset({"enough", "in_master"})

# (name in the master table, variable of the statistics, FITS unit)
_MASTER_FLOAT_COLUMNS = (
    ("magnitude", "magnitude", "mag"),
    ("mediandev", "mediandev", "mag"),
    ("medianmeddev", "medianmeddev", "mag"),
    ("scatter_excess", "scatter_excess", None),  # dex: not a FITS unit
    ("mag_err", "mag_err", "mag"),
)

_UINT64_TZERO = 2**63

# Keywords that describe the structure of an HDU: never copied from an extra header.
_STRUCTURAL_KEY = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|TFIELDS|EXTNAME|EXTVER|END|"
    r"CHECKSUM|DATASUM|T(TYPE|FORM|UNIT|NULL|ZERO|SCAL|DIM|DISP)\d+)$"
)


# ---------------------------------------------------------------------------------------------------------
# helpers


def _source_ids_uint64(values: Any, what: str) -> np.ndarray:
    """Return source ids as uint64, refusing anything that is not an exact non-negative integer.

    Parameters
    ----------
    values : array_like
        The ids (integer dtype, signed or unsigned).
    what : str
        Where the ids come from, for the error message.

    Returns
    -------
    numpy.ndarray
        The ids as ``uint64`` (a copy).

    Raises
    ------
    BadInputError
        If the ids are not integers (ids must never pass through a float) or are negative.
    """
    arr = np.ma.getdata(np.asarray(values))
    if arr.dtype.kind == "u":
        return arr.astype(np.uint64)
    if arr.dtype.kind == "i":
        if arr.size and arr.min() < 0:
            raise BadInputError(None, f"{what}: negative source_id {int(arr.min())}")
        return arr.astype(np.uint64)
    raise BadInputError(None, f"{what}: source_id must be integers (int64 or uint64), not {arr.dtype}")


def _ascii_header_value(value: Any) -> Any:
    """Return ``value`` made safe for a FITS header (non-ASCII text backslash-escaped)."""
    if isinstance(value, str) and not value.isascii():
        return value.encode("ascii", "backslashreplace").decode("ascii")
    if isinstance(value, os.PathLike):
        return _ascii_header_value(os.fspath(value))
    return value


def _set_card(header: fits.Header, key: str, value: Any, comment: str | None = None) -> None:
    """Set ``key`` in ``header``; a ``(value, comment)`` tuple value carries its own comment."""
    if isinstance(value, tuple) and len(value) == 2:
        value, comment = value
    value = _ascii_header_value(value)
    if comment is None:
        header[key] = value
    else:
        header[key] = (value, comment)


def _primary_header(header: Mapping[str, Any], extra_header: Mapping[str, Any] | None) -> fits.Header:
    """Build the master's primary header: ``extra_header`` first, then :data:`HEADER_KEYS`."""
    result = fits.Header()
    if extra_header is not None:
        if isinstance(extra_header, fits.Header):
            for card in extra_header.cards:
                if card.keyword in ("COMMENT", "HISTORY", ""):
                    result.append(card, end=True)
                elif not _STRUCTURAL_KEY.match(card.keyword):
                    _set_card(result, card.keyword, card.value, card.comment or None)
        else:
            for key, value in extra_header.items():
                if not _STRUCTURAL_KEY.match(key.upper()):
                    _set_card(result, key, value)
    values = dict(header)
    values.setdefault("SOFTWARE", SOFTWARE)
    missing = [key for key in HEADER_KEYS if key not in values]
    if missing:
        raise PhotrefError(f"master header: missing keyword(s) {', '.join(missing)}")
    for key, comment in HEADER_KEYS.items():
        _set_card(result, key, values.pop(key), comment)
    for key, value in values.items():  # anything else the caller chose to record
        _set_card(result, key, value)
    return result


def _statistics_arrays(stats: xr.Dataset) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Return (source ids as uint64, {variable: (source, photometry) array}, in_catalog) from ``stats``.

    The arrays are in the dataset's source order; dtypes are int64 for counts, bool for flags and float64
    for everything else.
    """
    missing = [name for name in (*STAT_VECTOR_COLUMNS, "in_catalog") if name not in stats.variables]
    if "source_id" not in stats.variables:
        missing.insert(0, "source_id")
    if missing:
        raise PhotrefError(f"statistics dataset: missing variable(s) {', '.join(missing)}")
    if stats["source_id"].dims != ("source",):
        raise PhotrefError(f"statistics dataset: source_id has dims {stats['source_id'].dims}, not (source,)")
    source_ids = _source_ids_uint64(stats["source_id"].values, "statistics")
    stats = stats[[*STAT_VECTOR_COLUMNS, "in_catalog"]].compute()
    arrays = {}
    for name in STAT_VECTOR_COLUMNS:
        var = stats[name]
        if set(var.dims) != {"source", "photometry"}:
            raise PhotrefError(f"statistics dataset: {name} has dims {var.dims}, not (source, photometry)")
        values = var.transpose("source", "photometry").values
        if name in _COUNT_COLUMNS:
            values = values.astype(np.int64)
        elif name in _BOOL_COLUMNS:
            values = values.astype(bool)
        else:
            values = values.astype(np.float64)
        arrays[name] = values
    if stats["in_catalog"].dims != ("source",):
        raise PhotrefError(
            f"statistics dataset: in_catalog has dims {stats['in_catalog'].dims}, not (source,)"
        )
    in_catalog = stats["in_catalog"].values.astype(bool)
    if source_ids.size > 1:
        sorted_ids = np.sort(source_ids)
        duplicated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if duplicated.size:
            raise PhotrefError(f"statistics dataset: duplicate source_id {int(duplicated[0])}")
    return source_ids, arrays, in_catalog


def _id_column(ids: np.ndarray) -> fits.Column:
    """Return the unsigned 64-bit ``source_id`` column (FITS ``K``, ``TZERO = 2**63``)."""
    return fits.Column(name="source_id", format="K", bzero=_UINT64_TZERO, array=ids.astype(np.uint64))


def _text_column(name: str, values: Any) -> fits.Column:
    """Return a FITS ``A`` column holding ``values`` as UTF-8 bytes."""
    encoded = [str(value).encode("utf-8") for value in values]
    width = max([1, *map(len, encoded)])
    return fits.Column(name=name, format=f"{width}A", array=np.array(encoded, dtype=f"S{width}"))


def _frames_hdu(frames: Table) -> fits.BinTableHDU:
    """Return the ``INMASTER`` HDU for ``frames`` (columns ``frame_id``, ``path``, ``included``)."""
    missing = [name for name in ("frame_id", "path", "included") if name not in frames.colnames]
    if missing:
        raise PhotrefError(f"frames table: missing column(s) {', '.join(missing)}")
    paths = []
    for value in frames["path"]:
        path = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        paths.append(path if "://" in path else os.path.abspath(path))
    frame_ids = [
        value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in frames["frame_id"]
    ]
    included = np.asarray(np.ma.filled(np.ma.asarray(frames["included"]), False), dtype=bool)
    columns = [
        _text_column("frame_id", frame_ids),
        _text_column("path", paths),
        fits.Column(name="included", format="L", array=included),
    ]
    return fits.BinTableHDU.from_columns(columns, name=FRAMES_EXTNAME)


# ---------------------------------------------------------------------------------------------------------
# master


def write_master(
    path: str | os.PathLike,
    stats: xr.Dataset,
    frames: Table,
    header: Mapping[str, Any],
    extra_header: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> pathlib.Path:
    """Write the master photometric reference FITS file (atomically).

    Parameters
    ----------
    path : str or os.PathLike
        The master file to write.
    stats : xarray.Dataset
        The statistics, dims ``(source, photometry)`` with sources in any order, coordinate ``source_id``
        (uint64 or int64) and the variables of :data:`STAT_VECTOR_COLUMNS` plus ``in_catalog``. A star is
        written for photometry p when ``in_master[:, p]`` is true.
    frames : astropy.table.Table
        One row per frame: ``frame_id`` (str), ``path`` (str; made absolute unless it is a URL),
        ``included`` (bool). Written as the last HDU, ``INMASTER``.
    header : Mapping[str, Any]
        Values of the primary-header keywords :data:`HEADER_KEYS` (SOFTWARE defaults to this package's
        name and version); any other keyword given is written after them. A value may be a
        ``(value, comment)`` tuple.
    extra_header : Mapping[str, Any] or astropy.io.fits.Header, optional
        Keywords written first in the primary header (structural keywords such as NAXIS are skipped).
    overwrite : bool, optional
        Replace an existing file (default). When false an existing file raises :class:`FileExistsError`.

    Returns
    -------
    pathlib.Path
        The absolute path of the master.

    Raises
    ------
    PhotrefError
        If ``stats``, ``frames`` or ``header`` lack something required, or source ids repeat.
    BadInputError
        If source ids are not non-negative integers.
    """
    source_ids, arrays, _ = _statistics_arrays(stats)
    order = np.argsort(source_ids, kind="stable")
    n_phot = arrays["in_master"].shape[1]

    hdus = [fits.PrimaryHDU(header=_primary_header(header, extra_header))]
    for phot in range(n_phot):
        rows = order[arrays["in_master"][order, phot]]
        columns = [
            _id_column(source_ids[rows]),
            fits.Column(name="full_count", format="K", array=arrays["full_count"][rows, phot]),
            fits.Column(name="rejected_count", format="K", array=arrays["rejected_count"][rows, phot]),
        ]
        columns += [
            fits.Column(name=name, format="D", unit=unit, array=arrays[variable][rows, phot])
            for name, variable, unit in _MASTER_FLOAT_COLUMNS
        ]
        hdu = fits.BinTableHDU.from_columns(columns, name=MASTER_EXTNAME, ver=phot + 1)
        hdu.header["PHOTIDX"] = (phot, "photometry index (0-based)")
        hdus.append(hdu)
    hdus.append(_frames_hdu(frames))
    return atomic_writeto(fits.HDUList(hdus), path, overwrite)


def read_master(path: str | os.PathLike) -> dict[str, Any]:
    """Read a master photometric reference.

    Parameters
    ----------
    path : str or os.PathLike
        A master written by :func:`write_master` (or by AutoWISP: unnamed table HDUs are taken as the
        photometries, in order, when no ``MPHOTREF`` HDU exists).

    Returns
    -------
    dict
        ``header``: the primary header (:class:`astropy.io.fits.Header`);
        ``photometries``: one :class:`astropy.table.Table` per photometry, in EXTVER order, ``source_id``
        as uint64; ``frames``: the ``INMASTER`` table (text columns as str), or ``None`` when absent.

    Raises
    ------
    BadInputError
        If the file cannot be read as a FITS master.
    """
    path = os.fspath(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header.copy()
            named = [
                (hdu.ver, index) for index, hdu in enumerate(hdul) if index and hdu.name == MASTER_EXTNAME
            ]
            if named:
                indices = [index for _, index in sorted(named)]
            else:
                indices = [
                    index
                    for index, hdu in enumerate(hdul)
                    if index and hdu.name == "" and isinstance(hdu, fits.BinTableHDU)
                ]
            if not indices:
                raise BadInputError(
                    path, f"no {MASTER_EXTNAME} table HDU: not a master photometric reference"
                )
            photometries = [Table.read(hdul[index]) for index in indices]
            frames = None
            if FRAMES_EXTNAME in hdul:
                frames = Table.read(hdul[FRAMES_EXTNAME])
                for name in frames.colnames:
                    if frames[name].dtype.kind == "S":
                        raw = np.asarray(frames[name]).tolist()
                        frames[name] = Column([value.decode("utf-8") for value in raw], dtype=str, name=name)
    except BadInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInputError(path, f"cannot read master photometric reference: {error}") from error
    return {"header": header, "photometries": photometries, "frames": frames}


# ---------------------------------------------------------------------------------------------------------
# statistics table


def _join_catalog(source_ids: np.ndarray, catalog: Table, taken: set[str]) -> list[Column]:
    """Return the catalog columns (but ``source_id``) matched to ``source_ids``, masked where absent.

    A catalog column whose name is already taken by the statistics is renamed ``catalog_<name>``. Float
    columns hold NaN where the star is absent from the catalog (and are masked there).
    """
    if "source_id" not in catalog.colnames:
        raise BadInputError(None, "catalog has no source_id column")
    cat_ids = _source_ids_uint64(catalog["source_id"], "catalog")
    cat_order = np.argsort(cat_ids, kind="stable")
    sorted_ids = cat_ids[cat_order]
    if sorted_ids.size > 1:
        duplicated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if duplicated.size:
            raise BadInputError(None, f"catalog: duplicate source_id {int(duplicated[0])}")
    if sorted_ids.size:
        pos = np.clip(np.searchsorted(sorted_ids, source_ids), 0, sorted_ids.size - 1)
        found = sorted_ids[pos] == source_ids
        rows = cat_order[pos[found]]
    else:
        found = np.zeros(source_ids.size, dtype=bool)
        rows = np.zeros(0, dtype=np.intp)

    columns = []
    for name in catalog.colnames:
        if name == "source_id":
            continue
        column = catalog[name]
        data = np.ma.getdata(column)
        shape = (source_ids.size, *data.shape[1:])
        values = np.zeros(shape, dtype=data.dtype)
        if data.dtype.kind in "fc":
            values[...] = np.nan
        values[found] = data[rows]
        mask = np.ones(shape, dtype=bool)
        mask[found] = np.ma.getmaskarray(column)[rows]
        out_name = name if name not in taken else f"catalog_{name}"
        columns.append(
            MaskedColumn(values, mask=mask, name=out_name, unit=column.unit, description=column.description)
        )
    return columns


def statistics_table(stats: xr.Dataset, catalog: Table | None) -> Table:
    """Build the statistics table: one row per star, sorted by ``source_id``.

    Parameters
    ----------
    stats : xarray.Dataset
        The statistics (see :func:`write_master`); every star in it gets a row.
    catalog : astropy.table.Table or None
        The catalog, joined on ``source_id``: its other columns follow ``in_catalog``, masked (and NaN for
        floats) for stars absent from it. A catalog column named like a statistics column is renamed
        ``catalog_<name>``.

    Returns
    -------
    astropy.table.Table
        Columns ``source_id`` (uint64); the vector columns (length P) of :data:`STAT_VECTOR_COLUMNS`;
        ``in_catalog``; the catalog columns.

    Raises
    ------
    PhotrefError
        If ``stats`` lacks a variable or repeats a source id.
    BadInputError
        If source ids are not non-negative integers, or the catalog lacks or repeats ``source_id``.
    """
    source_ids, arrays, in_catalog = _statistics_arrays(stats)
    order = np.argsort(source_ids, kind="stable")
    source_ids = source_ids[order]
    table = Table()
    table["source_id"] = Column(source_ids, dtype=np.uint64)
    for name in STAT_VECTOR_COLUMNS:
        table[name] = Column(arrays[name][order])
    table["in_catalog"] = Column(in_catalog[order])
    for unit_name in (
        "magnitude",
        "mediandev",
        "medianmeddev",
        "mag_err",
        "mag_err_mediandev",
        "mag_err_medianmeddev",
    ):
        table[unit_name].unit = "mag"
    if catalog is not None:
        for column in _join_catalog(source_ids, catalog, set(table.colnames)):
            table.add_column(column)
    return table


def _unused_integer(values: np.ndarray) -> int:
    """Return an integer of ``values``' dtype that does not occur in ``values`` (for TNULL)."""
    info = np.iinfo(values.dtype)
    present = np.unique(values)
    for candidate in (info.min, info.max):
        if candidate not in present:
            return int(candidate)
    # Every extreme is taken: the smallest gap above the minimum.
    gaps = np.nonzero(np.diff(present.astype(object)) > 1)[0]
    return int(present[gaps[0]]) + 1


def _fits_ready(table: Table) -> Table:
    """Return a copy of ``table`` that FITS can hold losslessly.

    Text becomes UTF-8 bytes; masked integer columns get a null value that occurs nowhere in the data
    (astropy's default one may be a real value); masked booleans (FITS ``L`` has no null) become false
    under the mask, ``in_catalog`` telling which stars the catalog lacks.
    """
    out = Table(table, copy=True)
    for name in out.colnames:
        column = out[name]
        kind = column.dtype.kind
        if kind in "UO":
            encoded = np.array(
                [str(value).encode("utf-8") for value in np.ma.getdata(column).ravel()], dtype=bytes
            ).reshape(column.shape)
            if encoded.dtype.itemsize == 0:
                encoded = encoded.astype("S1")
            if isinstance(column, MaskedColumn):
                out[name] = MaskedColumn(encoded, mask=column.mask, name=name, unit=column.unit)
            else:
                out[name] = Column(encoded, name=name, unit=column.unit)
        elif isinstance(column, MaskedColumn) and np.any(column.mask):
            if kind == "b":
                out[name] = Column(column.filled(False), name=name, unit=column.unit)
            elif kind in "iu":
                column.fill_value = _unused_integer(np.ma.getdata(column)[~column.mask])
        elif isinstance(column, MaskedColumn):
            out[name] = Column(np.ma.getdata(column), name=name, unit=column.unit)
    return out


def write_statistics_table(path: str | os.PathLike, stats: xr.Dataset, catalog: Table | None) -> pathlib.Path:
    """Write the statistics table as a FITS binary table (atomically, replacing any existing file).

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (the caller puts ``stat`` in its name).
    stats : xarray.Dataset
        The statistics (see :func:`statistics_table`).
    catalog : astropy.table.Table or None
        The catalog to join (see :func:`statistics_table`).

    Returns
    -------
    pathlib.Path
        The absolute path written. The table is HDU 1, EXTNAME ``STATISTICS``; ``source_id`` is unsigned
        64-bit (``K`` with ``TZERO = 2**63``), text is UTF-8.
    """
    table = _fits_ready(statistics_table(stats, catalog))
    hdu = fits.table_to_hdu(table)
    hdu.name = STATISTICS_EXTNAME
    return atomic_writeto(fits.HDUList([fits.PrimaryHDU(), hdu]), path, overwrite=True)
