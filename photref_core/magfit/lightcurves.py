"""Light curves out of a store (SPEC 9): the final magnitude-fitting iteration's magnitudes (or the raw
ones), one row per (frame, source) measurement, sorted by source, then time.

Columns (:data:`LIGHT_CURVE_COLUMNS`)::

    frame_id   str        FRAMEID
    time       float64    JD of the frame (NaN when the frame has none; such frames sort last)
    source_id  uint64     exact (FITS: K with TZERO = 2**63; parquet: uint64)
    mag        (P,)       the store's dtype; NaN kept as NaN (the flag says why)
    mag_err    (P,)       the measurement's error (magnitude fitting keeps it; NaN where it gave no mag)
    flag       (P,) uint8 bits, per photometry (:data:`FLAG_BITS`)

What counts as a measurement: a source with a finite raw magnitude in at least one photometry of an
ingested frame. A frame quarantined at ingestion has no data in the store and gives no rows; a frame
the final fit quarantined keeps its rows, NaN, flagged.

The flags describe the measurement, whichever magnitudes are exported (``raw`` too); they come from the
store's last finished magnitude-fitting loop and its final master, so they are all 0 but
:data:`NO_VALUE` when ``raw`` is asked of a store without one, or of a store changed since (fitted
magnitudes of a changed store are refused: the loop did not see the new frames):

* :data:`FRAME_QUARANTINED` (1): the final iteration's fit quarantined the frame;
* :data:`OUTLIER` (2): the final master's iterative rejection (SPEC 3) rejected this fitted magnitude,
  recomputed exactly (:func:`photref_core.master.stats.kept_ranges`) on the frames the master used;
* :data:`NOT_IN_MASTER` (4): the star is not in the final master in this photometry;
* :data:`NO_VALUE` (8): ``mag`` is NaN.

Memory is bounded: the rows are made and written a block of sources at a time (all frames of a block's
sources, which the outlier flag needs), each block's working memory within ``block_bytes`` whatever the
size of the store. The store is chunked for its writers (a few frames by many sources), so a block read
straight from it would decompress every chunk of the store; with more than one block the arrays are first
copied, each chunk read once, into a scratch zarr store chunked a block of sources wide with the sources in
id order (:func:`light_curve_blocks`), and each block then reads exactly its own chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .._atomic import atomic_stream
from ..errors import BadInputError, StoreError
from ..ingest.readers import valid_measurements
from ..keys import file_key
from ..master.outofcore import DEFAULT_BLOCK_BYTES
from ..master.stats import RejectionParameters, kept_ranges
from ..store.frames import frame_states
from ..store.groups import load_group
from ..store.schema import INGESTED, committed_sizes, open_store, store_url
from .loop import latest_summary

__all__ = [
    "FLAG_BITS",
    "FRAME_QUARANTINED",
    "LIGHT_CURVE_COLUMNS",
    "LIGHT_CURVE_FORMATS",
    "NOT_IN_MASTER",
    "NO_VALUE",
    "OUTLIER",
    "LightCurveSource",
    "block_bytes_per_source",
    "light_curve_blocks",
    "light_curve_request",
    "light_curves",
    "open_light_curves",
    "read_light_curves",
    "read_source_ids",
    "write_light_curves",
]

FRAME_QUARANTINED = 1
OUTLIER = 2
NOT_IN_MASTER = 4
NO_VALUE = 8

FLAG_BITS = {
    FRAME_QUARANTINED: "frame quarantined by the final magnitude fit",
    OUTLIER: "rejected as an outlier by the final master's statistics",
    NOT_IN_MASTER: "star not in the final master (this photometry)",
    NO_VALUE: "no magnitude (NaN)",
}
"""Bit -> meaning of the ``flag`` column (also written into every file's header or metadata)."""

LIGHT_CURVE_COLUMNS = ("frame_id", "time", "source_id", "mag", "mag_err", "flag")

LIGHT_CURVE_FORMATS = ("fits", "parquet")

# A block's arrays (:func:`light_curve_blocks`): the frame as an index into the source's frame ids.
_BLOCK_COLUMNS = ("frame_index", "time", "source_id", "mag", "mag_err", "flag")

_SUFFIX = {"fits": ".fits", "parquet": ".parquet"}

_EXTNAME = "LIGHTCURVES"


@dataclasses.dataclass(frozen=True)
class LightCurveSource:
    """What a light-curve export reads (:func:`open_light_curves`): fixed before any block is read.

    Frames are the ingested slots in time order; sources the selected store indices in source-id order.
    """

    store: str
    raw: bool
    run_group: str | None  # the magnitude-fitting run the flags come from (None: no run)
    fitted_group: str | None  # its final iteration: what its final master was built from
    frame_slots: np.ndarray
    frame_ids: np.ndarray
    times: np.ndarray
    frame_quarantined: np.ndarray  # per frame (in order): the final fit quarantined it; the final master
    # was built from every other one (all of them ingested)
    source_index: np.ndarray
    source_ids: np.ndarray
    in_master: np.ndarray | None  # (selected source, photometry), in source order
    rejection: RejectionParameters | None
    n_photometries: int
    dtype: np.dtype

    @property
    def data_group(self) -> str | None:
        """Where ``mag``/``mag_err`` are read: the final iteration, or None (the root) for raw ones."""
        return None if self.raw else self.fitted_group

    @property
    def metadata(self) -> dict[str, str]:
        """What every file says about where its rows come from."""
        return {
            "store": self.store,
            "magnitudes": "raw" if self.raw else f"fitted ({self.data_group})",
            "magfit_run": self.run_group or "",
            "flag_bits": json.dumps({str(bit): text for bit, text in FLAG_BITS.items()}),
        }


def read_source_ids(path) -> np.ndarray:
    """Source ids from a text file: one per line (exact 64-bit integers); blank lines and ``#`` comments
    are skipped.

    Raises
    ------
    BadInputError
        Naming the file and the first line that is not a source id.
    """
    ids = []
    with open(path) as stream:
        for number, line in enumerate(stream, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                value = int(text)
            except ValueError:
                raise BadInputError(path, f"line {number}: {text!r} is not a source id") from None
            if not 0 <= value < 2**64:
                raise BadInputError(path, f"line {number}: {value} is not a 64-bit unsigned source id")
            ids.append(value)
    if not ids:
        raise BadInputError(path, "lists no source id")
    return np.array(ids, dtype=np.uint64)


def open_light_curves(store, raw: bool = False, sources=None, sources_path=None) -> LightCurveSource:
    """Decide what an export reads: the final iteration's group (or the raw magnitudes), the frames in
    time order, the sources in id order, and what the flags need.

    Parameters
    ----------
    store : str or os.PathLike
        The photref store.
    raw : bool
        Export the raw (ingested) magnitudes instead of the fitted ones.
    sources : array_like of uint64, optional
        Only these sources (default: every source of the store).
    sources_path : str, optional
        The file ``sources`` were read from, named by the error when some are not in the store.

    Raises
    ------
    StoreError
        When the store has no finished magnitude-fitting loop (and ``raw`` is false): run
        ``photref magfit`` first; or when the loop's final master is no longer in the store.
    BadInputError
        When a requested source id is not in the store.
    """
    url = store_url(store)
    root = open_store(url)
    n_frames, n_src = committed_sizes(root)
    summary = latest_summary(url)
    if summary is not None and summary.get("store_version") != root.attrs.get("content_version", ""):
        if not raw:
            raise StoreError(
                f"{url}: the store changed (frames ingested) since its last magnitude fit "
                f"({summary['run_group']}): run `photref magfit` again (or export the raw magnitudes with "
                "--raw)"
            )
        summary = None  # raw magnitudes of a changed store: no flags from a loop that did not see them
    if summary is None and not raw:
        raise StoreError(
            f"{url}: no magnitude-fitting results in this store: run `photref magfit {url} --catalog CAT "
            "--output MASTER.fits` first (or export the raw magnitudes with --raw)"
        )
    states = frame_states(root, n_frames)
    times_all = root["time"][:n_frames].astype(np.float64)
    slots = np.flatnonzero(states == INGESTED)
    slots = slots[np.argsort(times_all[slots], kind="stable")]  # NaN times last, then by slot
    quarantined = np.zeros(slots.size, bool)
    in_master = rejection = None
    all_ids = root["source_id"][:n_src]
    if sources is None:
        index = np.arange(n_src)
    else:
        wanted = np.unique(np.asarray(sources, dtype=np.uint64))
        order = np.argsort(all_ids, kind="stable")
        pos = np.minimum(np.searchsorted(all_ids, wanted, sorter=order), max(n_src - 1, 0))
        found = all_ids[order[pos]] == wanted if n_src else np.zeros(wanted.size, bool)
        if not found.all():
            missing = wanted[~found]
            listed = ", ".join(str(s) for s in missing[:5]) + (" ..." if missing.size > 5 else "")
            raise BadInputError(sources_path, f"{missing.size} source id(s) not in the store {url}: {listed}")
        index = order[pos]
    index = index[np.argsort(all_ids[index], kind="stable")]
    if summary is not None:
        final = summary["iterations"][-1]
        groups = (final["group"], final.get("statistics"), final.get("fit"))
        if any(name is None or name not in root for name in groups):
            raise StoreError(
                f"{url}: the last magnitude-fitting run ({summary['run_group']}) predates light curves or "
                "its final master is no longer in the store: run `photref magfit` again"
            )
        fitted = root[final["group"]]["fitted"][:n_frames]
        quarantined = ~fitted[slots]
        in_master = load_group(url, final["fit"])["in_master"].values[index]
        attrs = root[final["statistics"]].attrs
        rejection = RejectionParameters(
            **{field.name: attrs[field.name] for field in dataclasses.fields(RejectionParameters)}
        )
    return LightCurveSource(
        store=url,
        raw=raw,
        run_group=None if summary is None else summary["run_group"],
        fitted_group=None if summary is None else summary["final_group"],
        frame_slots=slots,
        frame_ids=np.array([str(name) for name in root["frame_id"][:n_frames][slots]], dtype=str),
        times=times_all[slots],
        frame_quarantined=quarantined,
        source_index=index,
        source_ids=all_ids[index].astype(np.uint64),
        in_master=in_master,
        rejection=rejection,
        n_photometries=int(root["mag"].shape[2]),
        dtype=root["mag"].dtype,
    )


# What one (frame, source) pair of a block costs at the peak of its processing, in bytes per photometry
# and fixed: the values and errors (and the fitted ones for the flags of a raw export), the rejection's
# sorted copy, the flags, the rows made of them. Measured with bench/lightcurves.py (400 frames x 20,000
# stars x 3): a budget counted as one float64 array grew the peak RSS by 18x that budget; counted with
# these figures, a 64 MiB budget grows it by ~134 MiB (the writer's records and buffers on top).
_BYTES_PER_VALUE = 56
_BYTES_PER_PAIR = 48


def block_bytes_per_source(source: LightCurveSource) -> int:
    """The working memory one source adds to a block (all its frames): blocks hold
    ``block_bytes // block_bytes_per_source(source)`` sources (at least one)."""
    return max(1, source.frame_slots.size) * (_BYTES_PER_VALUE * source.n_photometries + _BYTES_PER_PAIR)


def _block_sources(source: LightCurveSource, block_bytes: int) -> int:
    return max(1, int(block_bytes) // block_bytes_per_source(source))


def _needed_arrays(source: LightCurveSource) -> dict[str, tuple[str | None, str]]:
    """What every block reads: name -> (store group, array)."""
    arrays = {
        "measured": (None, "mag"),  # where the raw magnitudes are finite: what makes a row
        "mag": (source.data_group, "mag"),
        "mag_err": (source.data_group, "mag_err"),
    }
    if source.rejection is not None and source.fitted_group != source.data_group:
        arrays["fitted_mag"] = (source.fitted_group, "mag")
        arrays["fitted_err"] = (source.fitted_group, "mag_err")
    return arrays


def _store_array(root, where: tuple[str | None, str]):
    group, name = where
    return (root if group is None else root[group])[name]


def _read_rows(root, where, slots: np.ndarray, index: np.ndarray, measured: bool) -> np.ndarray:
    """``array[slots, index]`` (frames in slot order, sources in ``index`` order): the sources read in
    store order with one orthogonal selection; ``measured``: whether any photometry is finite."""
    stored = np.sort(index)
    values = _store_array(root, where).get_orthogonal_selection((slots, stored, slice(None)))
    if not np.array_equal(stored, index):
        values = values[:, np.searchsorted(stored, index)]
    return np.isfinite(values).any(axis=2) if measured else values


def _source_major_copy(
    root, source: LightCurveSource, arrays: dict, per_block: int, block_bytes: int, directory
):
    """The block's arrays copied into a scratch zarr store chunked a block of sources wide, the sources in
    id order (pass 1: every chunk of the store read once, a few frames at a time, all sources).

    Reading a block straight from the store would decompress every chunk holding any of its sources: the
    store's chunks span many sources (all of them on a small field), so each block would read the whole
    store again. After this copy a block reads exactly its own chunks.
    """
    import zarr

    slots = np.sort(source.frame_slots)
    n_sel = source.source_index.size
    n_phot = source.n_photometries
    # Frames a piece: its rows of every source (read, then put in id order: two copies) within the budget,
    # whole store frame chunks when the budget allows (a chunk is then decompressed once). The scratch
    # chunks are a piece by a block: the larger the budget, the fewer and larger the files.
    piece = max(1, block_bytes // max(1, 2 * 8 * n_sel * n_phot))
    chunk = root["mag"].chunks[0]
    if piece >= chunk:
        piece -= piece % chunk
    piece = int(max(1, min(piece, slots.size)))
    scratch = zarr.open_group(str(directory), mode="w")
    copies = {}
    for name, where in arrays.items():
        vector = name != "measured"
        copies[name] = scratch.create_array(
            name,
            shape=(slots.size, n_sel, *((n_phot,) if vector else ())),
            chunks=(piece, per_block, *((n_phot,) if vector else ())),
            dtype=_store_array(root, where).dtype if vector else bool,
            fill_value=np.nan if vector else False,
        )
    for lo in range(0, slots.size, piece):
        frames = slots[lo : lo + piece]
        for name, where in arrays.items():
            copies[name][lo : lo + frames.size] = _read_rows(
                root, where, frames, source.source_index, name == "measured"
            )
    return copies


def light_curve_blocks(
    source: LightCurveSource, block_bytes: int = DEFAULT_BLOCK_BYTES, scratch=None
) -> Iterator[dict]:
    """The light-curve rows, block of sources by block of sources, in the final order.

    Parameters
    ----------
    source : LightCurveSource
        What to read (:func:`open_light_curves`).
    block_bytes : int
        Working memory of one block (the peak grows by about this, plus one block's output).
    scratch : str or os.PathLike, optional
        Where the source-major scratch copy goes when there is more than one block (a temporary
        directory inside it, removed at the end; default: the system's temporary directory).

    Yields
    ------
    dict
        For a block's rows: ``frame_index`` (into ``source.frame_ids``) and the other columns of
        :data:`LIGHT_CURVE_COLUMNS` (``time``, ``source_id``, ``mag``, ``mag_err``, ``flag``).
    """
    import tempfile

    root = open_store(source.store)
    per_block = _block_sources(source, block_bytes)
    n_sel = source.source_index.size
    slots = np.sort(source.frame_slots)
    to_time = np.searchsorted(slots, source.frame_slots)  # slot order -> time order
    in_time_order = np.array_equal(to_time, np.arange(to_time.size))
    arrays = _needed_arrays(source)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".photref-lightcurves-") as directory:
        copies = None
        if n_sel > per_block:
            copies = _source_major_copy(root, source, arrays, per_block, block_bytes, directory)
        for start in range(0, n_sel, per_block):
            stop = min(start + per_block, n_sel)
            values = {}
            for name, where in arrays.items():
                if copies is None:
                    index = source.source_index[start:stop]
                    block = _read_rows(root, where, slots, index, name == "measured")
                else:
                    block = copies[name][:, start:stop]
                values[name] = block if in_time_order else block[to_time]
            yield _block_rows(source, values, start, stop)


def _block_rows(source: LightCurveSource, values: dict, start: int, stop: int) -> dict:
    """The rows of one block of sources from its (frame, source[, photometry]) arrays in time order."""
    mag, mag_err = values["mag"], values["mag_err"]
    flag = np.zeros(mag.shape, np.uint8)
    flag[source.frame_quarantined] |= FRAME_QUARANTINED
    if source.in_master is not None:
        flag |= np.where(source.in_master[start:stop], 0, NOT_IN_MASTER).astype(np.uint8)
    used = ~source.frame_quarantined  # the master's frames: ingested (every frame here) and fitted
    if source.rejection is not None and used.any():
        # The master was built from the final iteration's magnitudes and errors (raw exports too).
        fitted = values.get("fitted_mag", mag)
        fitted_err = values.get("fitted_err", mag_err)
        if used.all():
            flag |= _outliers(fitted, fitted_err, source.rejection)
        else:
            flag[used] |= _outliers(fitted[used], fitted_err[used], source.rejection)
    flag |= np.where(np.isfinite(mag), 0, NO_VALUE).astype(np.uint8)
    # Rows sorted by source, then time: the (source, frame) pairs of the transposed mask, in order.
    source_pos, frame_pos = np.nonzero(values["measured"].T)
    return {
        "frame_index": frame_pos.astype(np.int32),
        "time": source.times[frame_pos],
        "source_id": source.source_ids[start + source_pos],
        "mag": mag[frame_pos, source_pos],
        "mag_err": mag_err[frame_pos, source_pos],
        "flag": flag[frame_pos, source_pos],
    }


def _outliers(mag: np.ndarray, mag_err: np.ndarray, rejection: RejectionParameters) -> np.ndarray:
    """:data:`OUTLIER` where the master's rejection did not keep a measurement (frame, source, photometry)
    it used."""
    low, high = kept_ranges(mag, mag_err, rejection)
    values = np.asarray(mag, np.float64)
    with np.errstate(invalid="ignore"):
        kept = (values >= low[None]) & (values <= high[None])
    return np.where(valid_measurements(mag, mag_err) & ~kept, OUTLIER, 0).astype(np.uint8)


def _empty_block(source: LightCurveSource) -> dict:
    n_phot = source.n_photometries
    return {
        "frame_index": np.zeros(0, np.int32),
        "time": np.zeros(0, np.float64),
        "source_id": np.zeros(0, np.uint64),
        "mag": np.zeros((0, n_phot), source.dtype),
        "mag_err": np.zeros((0, n_phot), source.dtype),
        "flag": np.zeros((0, n_phot), np.uint8),
    }


def light_curves(store, raw: bool = False, sources=None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Table:
    """The light curves as one table in memory (for some stars, or a store that fits in memory;
    :func:`write_light_curves` writes any store in bounded memory).

    Parameters
    ----------
    store : str or os.PathLike
        The photref store, after ``photref magfit``.
    raw : bool
        The raw (ingested) magnitudes instead of the fitted ones.
    sources : array_like of uint64, optional
        Only these sources.
    block_bytes : int
        Working memory of a source block (:func:`light_curve_blocks`).

    Returns
    -------
    astropy.table.Table
        The columns of :data:`LIGHT_CURVE_COLUMNS`, sorted by source, then time; ``meta`` says where the
        rows come from and what the flag bits mean.
    """
    source = open_light_curves(store, raw, sources)
    blocks = [_empty_block(source), *light_curve_blocks(source, block_bytes)]
    columns = {name: np.concatenate([block[name] for block in blocks]) for name in _BLOCK_COLUMNS}
    columns["frame_id"] = source.frame_ids[columns.pop("frame_index")]
    table = Table({name: columns[name] for name in LIGHT_CURVE_COLUMNS})
    table["time"].unit = "d"
    table["mag"].unit = table["mag_err"].unit = "mag"
    table.meta.update(source.metadata)
    return table


# Metadata key -> FITS keyword (the flag bits get one keyword each: FLAG1, FLAG2, ...).
_FITS_KEYWORDS = {"store": "STORE", "magnitudes": "MAGS", "magfit_run": "MAGFITRN"}


def _fits_cards(metadata: dict) -> dict:
    cards = {_FITS_KEYWORDS[key]: metadata[key] for key in _FITS_KEYWORDS}
    cards.update({f"FLAG{bit}": text for bit, text in json.loads(metadata["flag_bits"]).items()})
    return cards


def _metadata_from_fits(header) -> dict:
    metadata = {key: header.get(keyword, "") for key, keyword in _FITS_KEYWORDS.items()}
    bits = {str(bit): header[f"FLAG{bit}"] for bit in FLAG_BITS if f"FLAG{bit}" in header}
    metadata["flag_bits"] = json.dumps(bits)
    return metadata


class _FitsWriter:
    """One binary-table HDU (``LIGHTCURVES``) streamed block by block: the header is written first with
    NAXIS2 = 0 and its card rewritten in place at the end (a FITS card is 80 fixed characters), so no
    block is held after it is written. The headers and the record layout are made once per export
    (:meth:`prepare`): a per-star file costs the write of its rows only."""

    @staticmethod
    def prepare(source: LightCurveSource) -> dict:
        n_phot = source.n_photometries
        width = max([1, *(len(name.encode()) for name in source.frame_ids)])
        big = source.dtype.newbyteorder(">")
        record = np.dtype(
            [
                ("frame_id", f"S{width}"),
                ("time", ">f8"),
                ("source_id", ">i8"),
                ("mag", big, (n_phot,)),
                ("mag_err", big, (n_phot,)),
                ("flag", "u1", (n_phot,)),
            ]
        )
        real = "E" if source.dtype.itemsize == 4 else "D"
        dim = f"({n_phot})"
        columns = [
            fits.Column("frame_id", f"{width}A"),
            fits.Column("time", "D", unit="d"),
            fits.Column("source_id", "K", bzero=2**63),  # uint64, exact
            fits.Column("mag", f"{n_phot}{real}", unit="mag", dim=dim),
            fits.Column("mag_err", f"{n_phot}{real}", unit="mag", dim=dim),
            fits.Column("flag", f"{n_phot}B", dim=dim),
        ]
        header = fits.BinTableHDU.from_columns(columns, nrows=0, name=_EXTNAME).header
        for key, value in _fits_cards(source.metadata).items():
            header[key] = value
        primary = fits.PrimaryHDU().header.tostring().encode("ascii")
        text = header.tostring()
        # The NAXIS2 card's offset: cards start every 80 characters.
        card = next(i for i in range(0, len(text), 80) if text[i : i + 8] == "NAXIS2  ")
        return {
            "record": record,
            "frame_ids": np.char.encode(source.frame_ids, "utf-8"),
            "headers": primary + text.encode("ascii"),
            "naxis2_at": len(primary) + card,
        }

    def __init__(self, stream, layout: dict):
        self.record = layout["record"]
        self.frame_ids = layout["frame_ids"]
        self.stream = stream
        self.rows = 0
        self.naxis2_at = stream.tell() + layout["naxis2_at"]
        stream.write(layout["headers"])

    def write(self, block: dict) -> None:
        records = np.empty(block["time"].size, self.record)
        records["frame_id"] = self.frame_ids[block["frame_index"]]
        records["time"] = block["time"]
        # TZERO 2**63: stored = value - 2**63, which is the value with its top bit flipped, read as int64.
        records["source_id"] = (block["source_id"].astype(np.uint64) ^ np.uint64(2**63)).view(np.int64)
        for name in ("mag", "mag_err", "flag"):
            records[name] = block[name]
        self.stream.write(records.tobytes())
        self.rows += records.size

    def close(self) -> None:
        size = self.rows * self.record.itemsize
        self.stream.write(b"\0" * (-size % 2880))
        end = self.stream.tell()
        self.stream.seek(self.naxis2_at)
        self.stream.write(fits.Card("NAXIS2", self.rows, "number of rows in table").image.encode("ascii"))
        self.stream.seek(end)


class _ParquetWriter:
    """One parquet file, a row group per block (pyarrow's writer streams them); the schema is made once
    per export (:meth:`prepare`)."""

    @staticmethod
    def prepare(source: LightCurveSource) -> dict:
        import pyarrow as pa

        real = pa.from_numpy_dtype(source.dtype)
        n_phot = source.n_photometries
        schema = pa.schema(
            [
                ("frame_id", pa.dictionary(pa.int32(), pa.string())),
                ("time", pa.float64()),
                ("source_id", pa.uint64()),
                ("mag", pa.list_(real, n_phot)),
                ("mag_err", pa.list_(real, n_phot)),
                ("flag", pa.list_(pa.uint8(), n_phot)),
            ],
            metadata={key: value.encode() for key, value in source.metadata.items()},
        )
        return {"schema": schema, "frame_ids": pa.array(source.frame_ids, pa.string()), "n_phot": n_phot}

    def __init__(self, stream, layout: dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.schema = layout["schema"]
        self.frame_ids = layout["frame_ids"]
        self.n_phot = layout["n_phot"]
        self.rows = 0
        self.writer = pq.ParquetWriter(stream, self.schema)

    def write(self, block: dict) -> None:
        pa = self.pa

        def vectors(values, kind):
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind), self.n_phot)

        arrays = [
            pa.DictionaryArray.from_arrays(pa.array(block["frame_index"], pa.int32()), self.frame_ids),
            pa.array(block["time"], pa.float64()),
            pa.array(block["source_id"].astype(np.uint64), pa.uint64()),
            *(vectors(block[name], self.schema.field(name).type.value_type) for name in ("mag", "mag_err")),
            vectors(block["flag"], pa.uint8()),
        ]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += block["time"].size

    def close(self) -> None:
        self.writer.close()


_WRITERS = {"fits": _FitsWriter, "parquet": _ParquetWriter}


def light_curve_request(output, per_star, format: str | None = None) -> str:
    """Check what an export is asked to write (before any work); return the output format: ``format``
    when given, else from the file name (``.parquet``/``.pq``: parquet, anything else: FITS).

    Raises
    ------
    ValueError
        When neither ``output`` nor ``per_star`` is given, or for a format other than
        :data:`LIGHT_CURVE_FORMATS`.
    """
    if output is None and per_star is None:
        raise ValueError("give an output file, a per-star directory, or both")
    if format is None:
        suffix = Path(os.fspath(output)).suffix.lower() if output is not None else ""
        format = "parquet" if suffix in (".parquet", ".pq") else "fits"
    if format not in LIGHT_CURVE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(LIGHT_CURVE_FORMATS)}, got {format!r}")
    return format


def _split_by_star(block: dict) -> Iterator[tuple[int, dict]]:
    """Each star's rows of a block (contiguous: the rows are sorted by source)."""
    ids = block["source_id"]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else np.zeros(0, int)
    for lo, hi in zip(starts, [*starts[1:], ids.size], strict=True):
        yield int(ids[lo]), {name: values[lo:hi] for name, values in block.items()}


def write_light_curves(
    store,
    output=None,
    format: str | None = None,
    per_star=None,
    sources=None,
    raw: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    sources_path=None,
    scratch=None,
) -> dict:
    """Write the light curves in bounded memory: one file of all rows, one file per star, or both.

    Parameters
    ----------
    store : str or os.PathLike
        The photref store, after ``photref magfit``.
    output : str or os.PathLike, optional
        The file of all rows (written atomically).
    format : {'fits', 'parquet'}, optional
        Default: from ``output``'s name (:func:`light_curve_request`).
    per_star : str or os.PathLike, optional
        A directory: one file per star with rows, ``<source_id>.fits`` (or ``.parquet``), and
        ``lightcurves.json`` saying what was written.
    sources : array_like of uint64, optional
        Only these sources (see :func:`read_source_ids`).
    raw : bool
        The raw magnitudes instead of the fitted ones.
    block_bytes : int
        Working memory of a source block (:func:`light_curve_blocks`).
    sources_path : str, optional
        Where ``sources`` came from (named by errors).
    scratch : str or os.PathLike, optional
        Directory of the temporary source-major copy a store of more than one block needs (about the size
        of the exported magnitudes; removed at the end). Default: beside the output (or per-star
        directory), on the same file system as what is written.

    Returns
    -------
    dict
        ``output``, ``per_star``, ``format``, ``rows``, ``stars`` (with at least one row), and ``files``
        (the identity of the output and of the per-star manifest, for :func:`products_intact
        <photref_core.master.steps.products_intact>`).
    """
    format = light_curve_request(output, per_star, format)
    source = open_light_curves(store, raw, sources, sources_path)
    writer_class = _WRITERS[format]
    layout = writer_class.prepare(source)
    suffix = _SUFFIX[format]
    if per_star is not None:
        per_star = Path(os.path.abspath(os.fspath(per_star)))
        per_star.mkdir(parents=True, exist_ok=True)
    rows = stars = 0
    with contextlib.ExitStack() as stack:
        writer = None
        if output is not None:
            output = Path(os.path.abspath(os.fspath(output)))
            writer = writer_class(stack.enter_context(atomic_stream(output)), layout)
        if scratch is None:
            scratch = per_star if output is None else output.parent
            Path(scratch).mkdir(parents=True, exist_ok=True)
        for block in light_curve_blocks(source, block_bytes, scratch):
            if writer is not None:
                writer.write(block)
            ids = block["source_id"]
            stars += int(np.count_nonzero(ids[1:] != ids[:-1])) + 1 if ids.size else 0
            if per_star is not None:
                for source_id, rows_of_star in _split_by_star(block):
                    with atomic_stream(per_star / f"{source_id}{suffix}") as stream:
                        star_writer = writer_class(stream, layout)
                        star_writer.write(rows_of_star)
                        star_writer.close()
            rows += ids.size
        if writer is not None:
            writer.close()
    result = {
        "output": None if output is None else str(output),
        "per_star": None if per_star is None else str(per_star),
        "format": format,
        "rows": rows,
        "stars": stars,
        **source.metadata,
    }
    files = [] if output is None else [str(output)]
    if per_star is not None:
        manifest = per_star / "lightcurves.json"
        with atomic_stream(manifest) as stream:
            stream.write(json.dumps(result, indent=1).encode())
        files.append(str(manifest))
    result["files"] = {path: file_key(path) for path in files}
    return result


def read_light_curves(path) -> Table:
    """A light-curve file written by :func:`write_light_curves` (FITS or parquet, by its content) as the
    table :func:`light_curves` returns."""
    with open(path, "rb") as stream:
        parquet = stream.read(4) == b"PAR1"
    if not parquet:
        with fits.open(path) as hdul:
            header = hdul[_EXTNAME].header
            table = Table.read(hdul, hdu=_EXTNAME)
        table.convert_bytestring_to_unicode()
        table.meta = _metadata_from_fits(header)
        return table
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pq.read_table(path)
    columns = {}
    for name in LIGHT_CURVE_COLUMNS:
        column = arrow.column(name).combine_chunks()
        if name == "frame_id":
            column = column.cast(pa.string())
        if name in ("mag", "mag_err", "flag"):
            size = column.type.list_size
            columns[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
        else:
            columns[name] = column.to_numpy(zero_copy_only=False)
    columns["frame_id"] = columns["frame_id"].astype(str)
    table = Table(columns)
    table.meta.update({key.decode(): value.decode() for key, value in (arrow.schema.metadata or {}).items()})
    return table
