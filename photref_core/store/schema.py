"""The per-field zarr v3 store (SPEC 2): its layout, and opening, creating and versioning it.

This docstring is THE description of the on-disk layout; other modules refer to it.

Root group (frame photometry)::

    mag, mag_err      (frame, source, photometry)  float, NaN where not measured
    source_id         (source,)                    uint64
    in_catalog        (source,)                    bool
    frame_id          (frame,)                     str   FRAMEID
    time              (frame,)                     float JD (NaN when the frame has none)
    frame_path        (frame,)                     str   absolute path of the file ingested
    frame_mtime_ns    (frame,)                     int64 file identity: modification time ...
    frame_size        (frame,)                     int64 ... and size
    frame_state       (frame,)                     int8  0 pending, 1 ingested, 2 quarantined
    frame_state_copy  (frame,)                     int8  one-chunk copy of frame_state, see below
    attrs: photref_schema, n_photometries (n_file_photometries, photometry_names when photometries were
           added), frames_per_chunk, axes (committed sizes), quarantine, content_version, catalog,
           frame_state_copy (the content version the copy matches; null while an ingestion runs)

Group ``source_columns`` (only when the frames carry extra per-source numeric columns, SPEC 9)::

    <name>            (frame, source)               float, one array per column (``x``, ``y``, ...), NaN
                                                     where the frame has no such row or column
    Same frame and source chunks as ``mag``: the writer of a frame chunk owns these chunks too.

Group ``magfit`` (:mod:`photref_core.magfit`): ``magfit/run-<key>/iter<k>`` holds one iteration's
fitted ``mag``, ``mag_err`` (frame, source, photometry) and ``fitted`` (frame,) with the same chunks as the
root's, and ``reference_mag`` (source, photometry), what it was fitted against; the run group's attributes
hold the loop's history and its final iteration.

Group ``results`` (:mod:`photref_core.store.groups`): ``results/statistics-<key>`` and
``results/fit-<key>``, xarray datasets (dims source x photometry) named after everything they depend on.

Group ``prf`` (pixel frames, :mod:`photref_core.ingest.images`)::

    flux, flux_err   (frame, pixel)  float32, the image flattened (row-major, ``image_shape`` in attrs)
    mask             (frame, pixel)  bool, True = bad pixel (MASK HDU nonzero, non-finite data or error)
    frame_id, time, frame_path, frame_mtime_ns, frame_size, wcs_header, frame_state   (frame,)
    prf/model-<key>  the shape model's arrays;  prf/fluxes-<key>  flux, flux_err, flag (frame, source)

Why it is safe to write in parallel without locks (zarr has none): the frame axis is cut into chunks of
``frames_per_chunk`` frames, and one writer owns every chunk of its frames (the data and the completion
marker ``frame_state`` share that frame chunking). All sizes are fixed by the planner
(:func:`photref_core.store.frames.plan_frames`) before any writer starts; writers never resize.
``frame_state`` is written after the data, so a frame counts as ingested only once its data are on disk,
and a run killed half-way redoes only unfinished frames. Everything on the frame and source axes other than
the data and the marker is written by the planner and the finaliser alone, while no writer runs.

Because every writer owns its chunks of ``frame_state``, that array has one small chunk per frame chunk,
and reading it whole means one file per chunk (5 ms at 1,000 frames, 50 ms at 10,000 here). So the
finaliser, the only writer at that point, also saves ``frame_state_copy`` (one chunk) and tags it with the
content version it matches; the planner clears the tag before it changes anything. Readers
(:func:`photref_core.store.frames.frame_states`) use the copy only while its tag equals
``content_version``, and the markers otherwise (an ingestion running or killed, a store written before the
copy existed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from ..errors import StoreError
from ..keys import hash_arrays
from .consolidated import drop_consolidated

if TYPE_CHECKING:  # xarray (and pandas under it) costs ~0.35 s to import: only where it is used
    import xarray as xr

__all__ = [
    "DATA_DIMS",
    "DEFAULT_FRAMES_PER_CHUNK",
    "FRAME_META",
    "INGESTED",
    "PENDING",
    "QUARANTINED",
    "SCHEMA_VERSION",
    "SOURCE_COLUMNS_GROUP",
    "TARGET_CHUNK_BYTES",
    "choose_chunks",
    "committed_sizes",
    "content_version",
    "create_data_arrays",
    "create_frame_axis",
    "create_source_columns",
    "create_store",
    "frames_per_chunk_for",
    "open_dataset",
    "open_group",
    "open_store",
    "read_whole",
    "resize_source_columns",
    "source_column_names",
    "source_axis_chunking",
    "store_exists",
    "store_url",
]


SCHEMA_VERSION = 1


PENDING, INGESTED, QUARANTINED = 0, 1, 2


DATA_DIMS = ["frame", "source", "photometry"]


TARGET_CHUNK_BYTES = 2 * 2**20


DEFAULT_FRAMES_PER_CHUNK = 16


FRAME_META = ("frame_id", "time", "frame_path", "frame_mtime_ns", "frame_size")


SOURCE_COLUMNS_GROUP = "source_columns"


def store_url(store) -> str:
    """The store's one spelling: an absolute path for a local store (``field.zarr``, ``./field.zarr`` and
    ``/data/field.zarr`` are the same store, and cache keys and locks must see one name), the URL as given
    for an fsspec URL (``memory://``, ``s3://``, ``file://``)."""
    text = os.fspath(store)
    return text if "://" in text else os.path.abspath(text)


def open_group(store, path: str | None = None, mode: str = "r") -> zarr.Group:
    """Open a group of a store the way every photref reader and writer does.

    Never from consolidated metadata (:mod:`photref_core.store.consolidated`: photref reads what is on
    disk), and in a writing mode the store's consolidated metadata is removed first, so it never outlives
    a change.

    Parameters
    ----------
    store : str or os.PathLike
        The store (directory or fsspec URL).
    path : str, optional
        The group inside it (default: the root).
    mode : {'r', 'r+', 'a', 'w'}
        As :func:`zarr.open_group`.
    """
    url = store_url(store)
    if mode != "r":
        drop_consolidated(url)
    return zarr.open_group(url, path=path, mode=mode, use_consolidated=False)


def open_store(store, mode: str = "r") -> zarr.Group:
    """Open an existing photref store and check its schema version.

    Parameters
    ----------
    store : str or os.PathLike
        Directory path or fsspec URL of the zarr store.
    mode : {'r', 'r+'}
        Read only, or read/write.

    Raises
    ------
    StoreError
        When there is no store there, or it was written by another schema version.
    """
    url = store_url(store)
    try:
        group = open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{url}: no photref store here ({exc})") from exc
    version = group.attrs.get("photref_schema")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{url}: store schema version {version!r}, this photref reads version {SCHEMA_VERSION}; "
            "re-ingest the frames into a new store"
        )
    return group


def store_exists(store) -> bool:
    """Whether a photref store (of any schema version) exists at ``store``."""
    try:
        group = open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
    return "photref_schema" in group.attrs


def open_dataset(store) -> xr.Dataset:
    """The store as an ``xarray.Dataset`` (dims frame, source, photometry; lazy dask arrays).

    Frames that are not ingested (pending or quarantined) are included with NaN data; select
    ``ds.frame_state == 1`` for the ingested ones.
    """
    n_frames, n_sources = committed_sizes(open_store(store))  # also checks the schema
    import xarray as xr

    ds = xr.open_zarr(store_url(store), consolidated=False)
    return ds.isel(frame=slice(0, n_frames), source=slice(0, n_sources))


def choose_chunks(
    n_sources: int, n_photometries: int, itemsize: int, frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK
) -> tuple[int, int, int]:
    """Chunk shape (frames, sources, photometries) of about 2 MiB.

    Frames per chunk is fixed (it is the unit of work of one writer); the source chunk is cut so that an
    out-of-core reader of a block of sources over all frames reads little it does not need.
    """
    per_source = frames_per_chunk * n_photometries * itemsize
    source_chunk = max(1024, TARGET_CHUNK_BYTES // per_source)
    return frames_per_chunk, int(min(max(n_sources, 1), source_chunk)), n_photometries


def committed_sizes(group) -> tuple[int, int]:
    """(frames, sources) of the last plan that finished.

    A plan resizes the arrays before it writes the new axis values; if it is killed in between, the
    slots beyond these sizes hold no real frame or source. Readers stop at these sizes and the next plan
    cuts the arrays back to them (:func:`_drop_uncommitted`) before it starts.
    """
    axes = group.attrs.get("axes")
    if axes is None:
        return group["frame_id"].shape[0], group["source_id"].shape[0]
    return int(axes["frames"]), int(axes["sources"])


def read_whole(group, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Whole arrays of a group, opened and read concurrently in one trip to zarr's I/O loop.

    Read one by one, each small array costs two trips (open, read): ~1-1.5 ms apiece here, which adds up
    in the read-only checks a cached re-run makes. Same values as ``group[name][:]``.
    """

    async def read(name):
        path = f"{group.path}/{name}" if group.path else name
        array = await zarr.api.asynchronous.open_array(store=group.store, path=path, mode="r")
        return await array.getitem(slice(None))

    async def read_all():
        return await asyncio.gather(*(read(name) for name in names))

    return dict(zip(names, sync(read_all()), strict=True))


def create_data_arrays(group, shape, chunks, dtype) -> None:
    """(Re)create ``mag`` and ``mag_err``.

    Blosc lz4 with bit shuffling: 8x faster than zarr's default zstd on these floats for the same ratio
    (measured on a 10 MB frame chunk: 13 ms against 106 ms, ratio 1.20 against 1.19).
    """
    for name in ("mag", "mag_err"):
        if name in group:
            del group[name]
        group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=np.nan,
            dimension_names=DATA_DIMS,
            attributes={"coordinates": "frame_id time source_id"},
            compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        )


def source_column_names(group) -> list[str]:
    """The extra per-source columns a store keeps (sorted), ``[]`` when its frames carry none."""
    if SOURCE_COLUMNS_GROUP not in group:
        return []
    return sorted(group[SOURCE_COLUMNS_GROUP].array_keys())


def create_source_columns(group, names) -> None:
    """Create the (frame, source) arrays of extra columns the store does not have yet, at the size and
    with the frame and source chunks of ``mag`` (planner only: no writer runs)."""
    missing = sorted(set(names) - set(source_column_names(group)))
    if not missing:
        return
    mag = group["mag"]
    columns = group.require_group(SOURCE_COLUMNS_GROUP)
    for name in missing:
        columns.create_array(
            name,
            shape=mag.shape[:2],
            chunks=mag.chunks[:2],
            dtype=mag.dtype,
            fill_value=np.nan,
            dimension_names=["frame", "source"],
            compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        )


def resize_source_columns(group, n_frames: int | None = None, n_sources: int | None = None) -> None:
    """Resize every extra-column array along the frame and/or source axis (planner only)."""
    for name in source_column_names(group):
        array = group[SOURCE_COLUMNS_GROUP][name]
        shape = (
            array.shape[0] if n_frames is None else n_frames,
            array.shape[1] if n_sources is None else n_sources,
        )
        if shape != array.shape:
            array.resize(shape)


def frames_per_chunk_for(n_sources: int, n_photometries: int, itemsize: int) -> int:
    """Frames per chunk so that a chunk row of all sources is about 2 MiB (a power of 2 in 4..64).

    A frame chunk is the unit of work of one writer task: bigger chunks mean fewer tasks (Prefect costs
    ~20-30 ms of server CPU a task here) and fewer, larger writes.
    """
    per_frame = max(1, n_sources * n_photometries * itemsize)
    frames = max(4, min(64, TARGET_CHUNK_BYTES // per_frame))
    return 1 << (int(frames).bit_length() - 1)


#: Set on the root group before a new store's first array and removed with the schema attributes: a
#: creation killed half-way is recognised (and redone) instead of refused as a foreign store.
_CREATING = "photref_creating"


def create_store(url, n_phot, dtype, frames_per_chunk) -> zarr.Group:
    group = open_group(url, mode="a")
    if "photref_schema" in group.attrs:
        return group
    attrs = group.attrs.asdict()
    partial = set(group.keys()) - {"prf", "results"}
    if attrs.get(_CREATING) is not None:
        # A creation killed before its schema attributes: its arrays are empty (no frame, no source
        # yet), so nothing is lost by creating them again.
        for name in partial:
            del group[name]
    elif partial or attrs:
        raise StoreError(f"{url}: exists and is not a photref store; choose an empty location")
    group.attrs[_CREATING] = SCHEMA_VERSION
    itemsize = np.dtype(dtype).itemsize
    create_data_arrays(group, (0, 0, n_phot), choose_chunks(0, n_phot, itemsize, frames_per_chunk), dtype)
    group.create_array("source_id", shape=(0,), chunks=(65536,), dtype="u8", dimension_names=["source"])
    group.create_array(
        "in_catalog", shape=(0,), chunks=(65536,), dtype=bool, fill_value=False, dimension_names=["source"]
    )
    create_frame_axis(group, frames_per_chunk)
    group.attrs.update(
        {
            "photref_schema": SCHEMA_VERSION,
            "n_photometries": n_phot,
            "frames_per_chunk": frames_per_chunk,
            "quarantine": {},
            "content_version": "",
            "axes": {"frames": 0, "sources": 0},
        }
    )
    del group.attrs[_CREATING]
    return group


def source_axis_chunking(group, n_sources):
    """Source chunk of the data arrays, fixed when the store first gets sources."""
    mag = group["mag"]
    if mag.shape[1] > 0:
        return mag.chunks[1]
    f, s, p = choose_chunks(n_sources, mag.shape[2], mag.dtype.itemsize, mag.chunks[0])
    return s


def content_version(store) -> str:
    """A short hash of what the store holds (frames, their states and file identities, sources).

    Downstream results are cached on this: it changes exactly when the ingested data change.
    """
    group = open_store(store)
    names = ("frame_id", "frame_state", "frame_mtime_ns", "frame_size", "source_id", "in_catalog")
    mag = group["mag"]
    return hash_arrays(group, names, f"{mag.dtype} {mag.shape} {group.attrs.get('photometry_revision', 0)}")


def create_frame_axis(group, frames_per_chunk: int, extra_strings: Sequence[str] = ()) -> None:
    """Create the per-frame arrays of a group (size 0): ``frame_id``, ``frame_path``, ``time``, the file
    identity, any ``extra_strings`` (e.g. a WCS header) and the completion marker ``frame_state``, whose
    chunks are the frame chunks of the data (one writer owns both)."""
    meta_chunk = 4096
    for name in ("frame_id", "frame_path", *extra_strings):
        group.create_array(name, shape=(0,), chunks=(meta_chunk,), dtype=str, dimension_names=["frame"])
    group.create_array(
        "time", shape=(0,), chunks=(meta_chunk,), dtype="f8", fill_value=np.nan, dimension_names=["frame"]
    )
    for name in ("frame_mtime_ns", "frame_size"):
        group.create_array(name, shape=(0,), chunks=(meta_chunk,), dtype="i8", dimension_names=["frame"])
    group.create_array(
        "frame_state",
        shape=(0,),
        chunks=(frames_per_chunk,),
        dtype="i1",
        fill_value=0,
        dimension_names=["frame"],
    )
