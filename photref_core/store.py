"""The per-field zarr v3 store (SPEC 2) and its ingestion in three steps: plan, write batches, finalise.

Layout (root group)::

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

Why it is safe to write in parallel without locks (zarr has none): the frame axis is cut into chunks of
``frames_per_chunk`` frames, and one writer owns every chunk of its frames (``mag``, ``mag_err`` and the
completion marker ``frame_state`` share that frame chunking). All sizes are fixed by :func:`plan_ingestion`
before any writer starts; writers never resize. ``frame_state`` is written after the data, so a frame
counts as ingested only once its data are on disk, and a run killed half-way redoes only unfinished frames.
Everything on the frame and source axes other than the data and the marker is written by the planner and
the finaliser alone, while no writer runs.

Because every writer owns its chunks of ``frame_state``, that array has one small chunk per frame chunk,
and reading it whole means one file per chunk (5 ms at 1,000 frames, 50 ms at 10,000 here). So the
finaliser, the only writer at that point, also saves ``frame_state_copy`` (one chunk) and tags it with the
content version it matches; the planner clears the tag before it changes anything. Readers
(:func:`frame_states`) use the copy only while its tag equals ``content_version``, and the markers
otherwise (an ingestion running or killed, a store written before the copy existed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
import zarr
import zarr.api.asynchronous
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from .errors import BadInputError, StoreError
from .io import FrameHeader, read_frame, read_frame_header, retry_transient, valid_measurements

SCHEMA_VERSION = 1
PENDING, INGESTED, QUARANTINED = 0, 1, 2
DATA_DIMS = ["frame", "source", "photometry"]
TARGET_CHUNK_BYTES = 2 * 2**20
DEFAULT_FRAMES_PER_CHUNK = 16
_FRAME_META = ("frame_id", "time", "frame_path", "frame_mtime_ns", "frame_size")


def _url(store) -> str:
    return os.fspath(store)


def file_identity(path: str) -> tuple[int, int]:
    """(mtime in ns, size) of a file: a frame whose identity is unchanged needs no new ingestion."""
    st = os.stat(path)
    return int(st.st_mtime_ns), int(st.st_size)


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
    url = _url(store)
    try:
        group = zarr.open_group(url, mode=mode)
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
        group = zarr.open_group(_url(store), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
    return "photref_schema" in group.attrs


def open_dataset(store) -> xr.Dataset:
    """The store as an ``xarray.Dataset`` (dims frame, source, photometry; lazy dask arrays).

    Frames that are not ingested (pending or quarantined) are included with NaN data; select
    ``ds.frame_state == 1`` for the ingested ones.
    """
    n_frames, n_sources = committed_sizes(open_store(store))  # also checks the schema
    ds = xr.open_zarr(_url(store), consolidated=False)
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


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


@dataclass
class FrameBatch:
    """The frames one writer ingests: all in the same frame chunk, so no other writer touches it."""

    chunk: int
    slots: list[int]
    paths: list[str]
    frame_ids: list[str]


@dataclass
class IngestionPlan:
    """What :func:`plan_ingestion` decided; every field is small (paths and ids, never data)."""

    store: str
    batches: list[FrameBatch]
    skipped: list[str]  # paths already ingested with an unchanged file
    quarantined: dict[str, dict] = field(default_factory=dict)  # path -> {frame_id, reason}
    n_frames: int = 0
    n_sources: int = 0
    n_photometries: int = 0

    @property
    def n_to_ingest(self) -> int:
        return sum(len(b.slots) for b in self.batches)


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


_STATE_COPY = "frame_state_copy"
_STATE_COPY_CHUNK = 2**20


def _state_copy_is_current(group) -> bool:
    """Whether ``frame_state_copy`` holds the markers of the store's current content version."""
    tag = group.attrs.get(_STATE_COPY)
    return tag is not None and tag == group.attrs.get("content_version")


def frame_states(group, n_frames: int | None = None) -> np.ndarray:
    """The completion markers (``frame_state``) of the first ``n_frames`` slots (default: all).

    Read from the finaliser's one-chunk copy when it matches the store's content version, else from the
    per-chunk markers themselves (see the module's notes).
    """
    return _read_states(group, ())[0][:n_frames]


def _read_states(group, other: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The markers of every slot (as :func:`frame_states`) and the ``other`` arrays, read in one trip."""
    name = _STATE_COPY if _state_copy_is_current(group) else "frame_state"
    try:
        arrays = read_whole(group, (name, "frame_id", *other))
    except FileNotFoundError:  # a tag without its copy (deleted by hand): the markers are the truth
        arrays = {}
    states = arrays.pop(name, None)
    if states is None or states.size != arrays["frame_id"].size:
        arrays = read_whole(group, ("frame_state", "frame_id", *other))
        states = arrays.pop("frame_state")
    return states, arrays


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


def _save_state_copy(group, state: np.ndarray, version: str) -> None:
    """Save the one-chunk copy of the markers and tag it with ``version`` (the tag last, so a copy cut
    short by a crash is never used)."""
    if _STATE_COPY in group:
        copy = group[_STATE_COPY]
        copy.resize(state.shape)
    else:
        copy = group.create_array(
            _STATE_COPY,
            shape=state.shape,
            chunks=(_STATE_COPY_CHUNK,),
            dtype="i1",
            fill_value=0,
            dimension_names=["frame"],
        )
    copy[:] = state
    group.attrs[_STATE_COPY] = version


def _forget_state_copy(group) -> None:
    """Clear the copy's tag before the markers change (the copy is stale from now until the finaliser)."""
    if group.attrs.get(_STATE_COPY) is not None:
        group.attrs[_STATE_COPY] = None


def _drop_uncommitted(group) -> None:
    """Cut the axes back to the last finished plan's sizes (see :func:`committed_sizes`)."""
    n_frames, n_sources = committed_sizes(group)
    if group["frame_id"].shape[0] == n_frames and group["source_id"].shape[0] == n_sources:
        return
    for name in ("mag", "mag_err"):
        group[name].resize((n_frames, n_sources, group[name].shape[2]))
    for name in ("source_id", "in_catalog"):
        group[name].resize((n_sources,))
    for name in _FRAME_META + ("frame_state",):
        group[name].resize((n_frames,))


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


def assign_slots(frame_ids: Sequence[str], slot_of_id: dict[str, int], n_old: int) -> tuple[list[int], int]:
    """Slots of new or changed frames: a FRAMEID already on the axis keeps its slot (re-ingestion
    overwrites it), a new one is appended. Returns the slots and the new length of the frame axis."""
    slots, next_slot = [], n_old
    for frame_id in frame_ids:
        if frame_id in slot_of_id:
            slots.append(slot_of_id[frame_id])
        else:
            slots.append(next_slot)
            next_slot += 1
    return slots, next_slot


def write_frame_axis(group, slots: Sequence[int], values: dict[str, Sequence]) -> None:
    """Write per-frame metadata (``values``: array name -> one value per slot) and reset the frames'
    markers to pending, in one read-modify-write of the slot range (no writer runs now)."""
    if not slots:
        return
    lo, hi = min(slots), max(slots) + 1
    rows = np.asarray(slots) - lo
    for name, column in values.items():
        block = group[name][lo:hi]
        for k, value in zip(rows, column, strict=True):
            block[k] = value
        group[name][lo:hi] = block
    state = group["frame_state"][lo:hi]
    state[rows] = PENDING
    group["frame_state"][lo:hi] = state


def cut_batches(
    slots: Sequence[int], paths: Sequence[str], frame_ids: Sequence[str], fpc: int
) -> list[FrameBatch]:
    """Group frames by frame chunk: one writer batch per chunk, so no two writers share a chunk."""
    by_chunk: dict[int, FrameBatch] = {}
    for slot, path, frame_id in sorted(zip(slots, paths, frame_ids, strict=True)):
        batch = by_chunk.setdefault(
            slot // fpc, FrameBatch(chunk=slot // fpc, slots=[], paths=[], frame_ids=[])
        )
        batch.slots.append(slot)
        batch.paths.append(path)
        batch.frame_ids.append(frame_id)
    return list(by_chunk.values())


def _scan(paths: Sequence[str], workers: int) -> list[FrameHeader | BadInputError]:
    def one(path):
        try:
            return retry_transient(read_frame_header, path)
        except BadInputError as exc:
            return exc

    if workers <= 1 or len(paths) < 8:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def _create_data_arrays(group, shape, chunks, dtype) -> None:
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


def frames_per_chunk_for(n_sources: int, n_photometries: int, itemsize: int) -> int:
    """Frames per chunk so that a chunk row of all sources is about 2 MiB (a power of 2 in 4..64).

    A frame chunk is the unit of work of one writer task: bigger chunks mean fewer tasks (Prefect costs
    ~20-30 ms of server CPU a task here) and fewer, larger writes.
    """
    per_frame = max(1, n_sources * n_photometries * itemsize)
    frames = max(4, min(64, TARGET_CHUNK_BYTES // per_frame))
    return 1 << (int(frames).bit_length() - 1)


def _create_store(url, n_phot, dtype, frames_per_chunk) -> zarr.Group:
    group = zarr.open_group(url, mode="a")
    if "photref_schema" in group.attrs:
        return group
    if set(group.keys()) - {"prf", "results"} or group.attrs.asdict():
        raise StoreError(f"{url}: exists and is not a photref store; choose an empty location")
    itemsize = np.dtype(dtype).itemsize
    _create_data_arrays(group, (0, 0, n_phot), choose_chunks(0, n_phot, itemsize, frames_per_chunk), dtype)
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
    return group


def _source_axis_chunking(group, n_sources):
    """Source chunk of the data arrays, fixed when the store first gets sources."""
    mag = group["mag"]
    if mag.shape[1] > 0:
        return mag.chunks[1]
    f, s, p = choose_chunks(n_sources, mag.shape[2], mag.dtype.itemsize, mag.chunks[0])
    return s


_FRAME_IDENTITY = ("frame_path", "frame_mtime_ns", "frame_size")


def _known_frames(group) -> tuple[dict, dict, dict]:
    """What the store knows of its frames: ``{path: (slot, frame_id, state, mtime_ns, size)}``,
    ``{frame_id: slot}`` and the quarantine records (all empty for no store)."""
    if group is None:
        return {}, {}, {}
    state, arrays = _read_states(group, _FRAME_IDENTITY)
    return *_index_frames(state, arrays), dict(group.attrs.get("quarantine", {}))


def _index_frames(state: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """``{path: (slot, frame_id, state, mtime_ns, size)}`` and ``{frame_id: slot}`` of the frame axis."""
    known: dict[str, tuple[int, str, int, int, int]] = {}
    slot_of_id: dict[str, int] = {}
    columns = [arrays[name].tolist() for name in ("frame_id", *_FRAME_IDENTITY)]
    for slot, (fid, path, mtime_ns, size, st) in enumerate(zip(*columns, state.tolist(), strict=True)):
        slot_of_id[fid] = slot
        known[path] = (slot, fid, st, mtime_ns, size)
    return known, slot_of_id


def _classify_frames(paths: list[str], known: dict, quarantine_prev: dict, strict: bool):
    """Split frame paths into (skipped, to_scan, identities, quarantined).

    Skipped: ingested (or quarantined) before from a file with the same path, mtime and size, so not
    opened again. Quarantined: files that cannot be stat'ed. To scan: everything else.
    """
    skipped, to_scan, identities, quarantined = [], [], {}, {}
    for path in paths:
        try:
            identities[path] = file_identity(path)
        except OSError as exc:
            reason = (
                "file does not exist"
                if isinstance(exc, FileNotFoundError)
                else (f"cannot stat the file ({exc.strerror or exc})")
            )
            if strict:
                raise BadInputError(path, reason) from exc
            quarantined[path] = {"frame_id": None, "reason": reason}
            continue
        prev = known.get(path)
        if prev is not None and prev[2] in (INGESTED, QUARANTINED) and prev[3:] == identities[path]:
            skipped.append(path)
            continue
        q = quarantine_prev.get(path)
        if (
            q is not None
            and (prev is None or prev[2] == QUARANTINED)
            and tuple(q.get("identity", ())) == identities[path]
        ):
            skipped.append(path)  # bad before, unchanged since: still bad, nothing to redo
            continue
        to_scan.append(path)
    return skipped, to_scan, identities, quarantined


def ingestion_needed(store, frame_paths: Iterable[str | os.PathLike], catalog=None) -> bool:
    """Whether :func:`plan_ingestion` would change anything for these frames and catalog (read only).

    False only when the store exists, its last plan finished, every frame was ingested (or quarantined)
    before from an unchanged file, and the catalog adds no source and changes no ``in_catalog`` flag: an
    ingestion run would then read nothing and write nothing, and may be left out.

    Parameters
    ----------
    store : str or os.PathLike
        Store directory or fsspec URL.
    frame_paths : iterable of path
        Frame photometry files.
    catalog : astropy.table.Table, optional
        From :func:`photref_core.io.read_catalog`, as it would be given to :func:`plan_ingestion`.
    """
    url = _url(store)
    if not store_exists(url):
        return True
    group = open_store(url)
    n_frames, n_sources = committed_sizes(group)
    state, arrays = _read_states(group, (*_FRAME_IDENTITY, "source_id", "in_catalog"))
    frame_sizes = {state.size} | {arrays[name].size for name in ("frame_id", *_FRAME_IDENTITY)}
    source_sizes = {arrays[name].size for name in ("source_id", "in_catalog")}
    if frame_sizes != {n_frames} or source_sizes != {n_sources}:
        return True  # a plan was killed half-way: the next plan cleans up
    known, _ = _index_frames(state, arrays)
    quarantine_prev = dict(group.attrs.get("quarantine", {}))
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in frame_paths))
    _, to_scan, _, unreadable = _classify_frames(paths, known, quarantine_prev, strict=False)
    if to_scan or unreadable:
        return True
    if catalog is not None:
        catalog_ids = np.asarray(catalog["source_id"], dtype=np.uint64)
        in_catalog = np.isin(arrays["source_id"], catalog_ids)
        if np.count_nonzero(in_catalog) != np.unique(catalog_ids).size:
            return True  # stars of the catalog without a source slot yet
        if not np.array_equal(arrays["in_catalog"], in_catalog):
            return True
        if "path" in catalog.meta and group.attrs.get("catalog") != catalog.meta["path"]:
            return True
    return False


def plan_ingestion(
    store,
    frame_paths: Iterable[str | os.PathLike],
    catalog=None,
    dtype="f8",
    frames_per_chunk: int | None = None,
    strict: bool = False,
    scan_workers: int = 2,
) -> IngestionPlan:
    """Fix the axes of the store before the fan-out, and cut the new frames into writer batches.

    Frames already ingested from an unchanged file (same path, mtime and size) are skipped without being
    opened. The others are scanned (header, source ids, P); bad ones are quarantined with the reason. The
    source axis becomes the catalog ids plus every id seen in a usable frame; the frame axis grows by the
    new frames. Arrays are resized here, never while writers run.

    Parameters
    ----------
    store : str or os.PathLike
        Store directory or fsspec URL (created when missing).
    frame_paths : iterable of path
        Frame photometry files (SPEC 1.1).
    catalog : astropy.table.Table, optional
        From :func:`photref_core.io.read_catalog`. Without one, no frame is quarantined for having no
        known star and ``in_catalog`` stays False.
    dtype : str
        Float type of ``mag``/``mag_err`` when the store is created (float64 keeps the input exactly).
    frames_per_chunk : int, optional
        Frames per chunk when the store is created; one writer task per chunk. Default: chunk rows of
        about 2 MiB (:func:`frames_per_chunk_for`).
    strict : bool
        Raise on the first bad frame instead of quarantining it.
    scan_workers : int
        Threads for the header pre-pass.

    Returns
    -------
    IngestionPlan
    """
    url = _url(store)
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in frame_paths))
    exists = store_exists(url)
    group = open_store(url, "r+") if exists else None
    if group is not None:
        _forget_state_copy(group)
        _drop_uncommitted(group)

    known, slot_of_id, quarantine_prev = _known_frames(group)
    skipped, to_scan, identities, quarantined = _classify_frames(paths, known, quarantine_prev, strict)

    scanned = _scan(to_scan, scan_workers)
    headers: list[FrameHeader] = []
    # Frame files carry the first n_file_photometries photometries; later ones (PSF photometry from the
    # PRF flow) are added by add_photometry.
    n_phot = (
        group.attrs.get("n_file_photometries", group.attrs["n_photometries"]) if group is not None else None
    )
    if n_phot is None:
        counts = [h.n_photometries for h in scanned if isinstance(h, FrameHeader)]
        if counts:
            values, freq = np.unique(counts, return_counts=True)
            n_phot = int(values[np.argmax(freq)])  # the majority decides P of a new store
    catalog_ids = (
        np.asarray(catalog["source_id"], dtype=np.uint64) if catalog is not None else np.zeros(0, np.uint64)
    )
    seen_ids: dict[str, str] = {}
    bad_slots: list[int] = []
    for path, result in zip(to_scan, scanned, strict=True):
        reason = None
        if isinstance(result, BadInputError):
            reason = result.problem
        elif result.n_photometries != n_phot:
            reason = f"has {result.n_photometries} photometries, the store has {n_phot}"
        elif result.source_id.size == 0:
            reason = "has no rows"
        elif catalog is not None and not np.isin(result.source_id, catalog_ids).any():
            reason = "has no star of the catalog"
        elif result.frame_id in seen_ids:
            reason = f"FRAMEID {result.frame_id!r} is also used by {seen_ids[result.frame_id]}"
        elif result.frame_id in slot_of_id and known.get(path, (None,))[0] != slot_of_id[result.frame_id]:
            other = next((p for p, k in known.items() if k[0] == slot_of_id[result.frame_id]), "?")
            if other != path and os.path.exists(other):
                reason = f"FRAMEID {result.frame_id!r} is already ingested from {other}"
        if reason is not None:
            if strict:
                raise BadInputError(path, reason)
            fid = result.frame_id if isinstance(result, FrameHeader) else None
            quarantined[path] = {"frame_id": fid, "reason": reason, "identity": list(identities[path])}
            if path in known:  # ingested before from a file that has since gone bad: stop using it
                bad_slots.append(known[path][0])
            continue
        seen_ids[result.frame_id] = path
        headers.append(result)

    # --- source axis: existing + catalog + seen, new ids appended in sorted order -------------------
    candidate = np.unique(np.concatenate([catalog_ids] + [h.source_id for h in headers]))
    if group is None:
        if n_phot is None:
            raise BadInputError(None, f"no readable frame among {len(paths)} file(s); nothing to ingest")
        if frames_per_chunk is None:
            frames_per_chunk = frames_per_chunk_for(candidate.size, n_phot, np.dtype(dtype).itemsize)
        group = _create_store(url, n_phot, dtype, frames_per_chunk)
    old_ids = group["source_id"][:]
    extra = np.setdiff1d(candidate, old_ids, assume_unique=True)
    n_sources = old_ids.size + extra.size
    in_catalog = np.isin(np.concatenate([old_ids, extra]), catalog_ids) if catalog is not None else None

    # --- frame axis: existing slots reused by FRAMEID, new frames appended ----------------------------
    n_old = group["frame_id"].shape[0]
    slots, n_frames = assign_slots([h.frame_id for h in headers], slot_of_id, n_old)

    # --- resize and write the axes (no writer runs now) ----------------------------------------------
    if n_sources != old_ids.size or n_frames != n_old:
        source_chunk = _source_axis_chunking(group, n_sources)
        for name in ("mag", "mag_err"):
            arr = group[name]
            if arr.shape[1] == 0 and arr.chunks[1] != source_chunk:
                # First sources of a new store: the source chunking is decided now, from their number.
                chunks = (arr.chunks[0], source_chunk, arr.chunks[2])
                _create_data_arrays(group, arr.shape, chunks, arr.dtype)
                arr = group[name]
            arr.resize((n_frames, n_sources, arr.shape[2]))  # P includes added photometries
        group["source_id"].resize((n_sources,))
        group["in_catalog"].resize((n_sources,))
        for name in _FRAME_META + ("frame_state",):
            group[name].resize((n_frames,))
    if extra.size:
        group["source_id"][old_ids.size :] = extra
    if in_catalog is not None:
        group["in_catalog"][:] = in_catalog

    write_frame_axis(
        group,
        slots,
        {
            "frame_id": [h.frame_id for h in headers],
            "time": [h.time for h in headers],
            "frame_path": [h.path for h in headers],
            "frame_mtime_ns": [identities[h.path][0] for h in headers],
            "frame_size": [identities[h.path][1] for h in headers],
        },
    )
    for slot in bad_slots:
        group["frame_state"][slot] = QUARANTINED

    batches = cut_batches(
        slots, [h.path for h in headers], [h.frame_id for h in headers], group["mag"].chunks[0]
    )

    # Quarantine records from the scan are kept now, so the report survives a crash of the writers.
    if quarantined:
        q = dict(group.attrs.get("quarantine", {}))
        q.update(quarantined)
        group.attrs["quarantine"] = q
    if catalog is not None and "path" in catalog.meta:
        group.attrs["catalog"] = catalog.meta["path"]
    # Last: the new sizes count only now that every axis value is written.
    group.attrs["axes"] = {"frames": int(n_frames), "sources": int(n_sources)}
    return IngestionPlan(
        store=url,
        batches=batches,
        skipped=skipped,
        quarantined=quarantined,
        n_frames=n_frames,
        n_sources=n_sources,
        n_photometries=n_phot,
    )


# --------------------------------------------------------------------------------------------------
# Writing (the fan-out)
# --------------------------------------------------------------------------------------------------


@dataclass
class FrameResult:
    """Outcome of ingesting one frame."""

    path: str
    frame_id: str
    slot: int
    state: int
    reason: str | None = None
    n_measurements: int = 0


def ingest_batch(store, batch: FrameBatch, strict: bool = False, reader=read_frame) -> list[FrameResult]:
    """Read the frames of one batch and write their rows of ``mag``/``mag_err``, then their markers.

    The batch owns its frame chunk: it reads the chunk's current rows (other frames of the chunk may
    have been ingested by an earlier run), replaces its own frames' rows and writes the chunk once.

    Parameters
    ----------
    store : str or os.PathLike
        The store prepared by :func:`plan_ingestion`.
    batch : FrameBatch
        One batch of the plan.
    strict : bool
        Raise on a bad frame instead of quarantining it.
    reader : callable
        Reads a frame path into a :class:`~photref_core.io.FramePhotometry` (tests inject faults here).

    Returns
    -------
    list of FrameResult
    """
    group = open_store(store, "r+")
    mag_arr, err_arr = group["mag"], group["mag_err"]
    n_file_phot = group.attrs.get("n_file_photometries", mag_arr.shape[2])
    source_ids = group["source_id"][:]
    sorter = np.argsort(source_ids, kind="stable")
    sorted_ids = source_ids[sorter]
    lo, hi = min(batch.slots), max(batch.slots) + 1
    mag = mag_arr[lo:hi]
    err = err_arr[lo:hi]
    states = group["frame_state"][lo:hi]
    results = []
    for slot, path, frame_id in zip(batch.slots, batch.paths, batch.frame_ids, strict=True):
        k = slot - lo
        mag[k, :, :n_file_phot] = np.nan
        err[k, :, :n_file_phot] = np.nan
        try:
            frame = retry_transient(reader, path)
            if frame.header.frame_id != frame_id:
                raise BadInputError(path, f"FRAMEID changed from {frame_id!r} to {frame.header.frame_id!r}")
            if frame.mag.shape[1] != n_file_phot:
                raise BadInputError(
                    path, f"has {frame.mag.shape[1]} photometries, the store has {n_file_phot}"
                )
            good = valid_measurements(frame.mag, frame.mag_err)
            if not good.any():
                raise BadInputError(path, "has no valid measurement (every mag or mag_err is NaN or <= 0)")
            pos = np.searchsorted(sorted_ids, frame.header.source_id)
            pos = np.minimum(pos, sorted_ids.size - 1)
            if not np.array_equal(sorted_ids[pos], frame.header.source_id):
                raise BadInputError(path, "has source ids that were not in it when the ingestion was planned")
            cols = sorter[pos]
            mag[k, cols, :n_file_phot] = frame.mag
            err[k, cols, :n_file_phot] = frame.mag_err
            states[k] = INGESTED
            results.append(FrameResult(path, frame_id, slot, INGESTED, None, int(good.sum())))
        except BadInputError as exc:
            if strict:
                raise
            mag[k] = np.nan  # a quarantined frame keeps no photometry at all
            err[k] = np.nan
            states[k] = QUARANTINED
            results.append(FrameResult(path, frame_id, slot, QUARANTINED, exc.problem, 0))
    # Data first, marker last: a frame is ingested only once its rows are written.
    dtype = mag_arr.dtype
    mag_arr[lo:hi] = mag.astype(dtype, copy=False)
    err_arr[lo:hi] = err.astype(dtype, copy=False)
    group["frame_state"][lo:hi] = states
    return results


# --------------------------------------------------------------------------------------------------
# Finalising
# --------------------------------------------------------------------------------------------------


def hash_arrays(group, names: Sequence[str], extra: str = "") -> str:
    """A short hash of a group's arrays ``names`` (and ``extra`` text): a content version."""
    h = hashlib.sha256()
    for name in names:
        values = group[name][:]
        h.update(name.encode())
        if values.dtype.kind in "OTU":
            h.update("\0".join(map(str, values)).encode())
        else:
            h.update(np.ascontiguousarray(values).tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def content_version(store) -> str:
    """A short hash of what the store holds (frames, their states and file identities, sources).

    Downstream results are cached on this: it changes exactly when the ingested data change.
    """
    group = open_store(store)
    names = ("frame_id", "frame_state", "frame_mtime_ns", "frame_size", "source_id", "in_catalog")
    mag = group["mag"]
    return hash_arrays(group, names, f"{mag.dtype} {mag.shape} {group.attrs.get('photometry_revision', 0)}")


def record_results(group, results: Iterable[FrameResult]) -> tuple[int, int]:
    """Add the writers' quarantines to the group's ``quarantine`` record (and drop frames that are good
    again); returns (frames ingested, frames quarantined)."""
    q = dict(group.attrs.get("quarantine", {}))
    n_ok = n_bad = 0
    for r in results:
        if r.state == QUARANTINED:
            n_bad += 1
            q[r.path] = {"frame_id": r.frame_id, "reason": r.reason, "identity": list(file_identity(r.path))}
        else:
            n_ok += 1
            q.pop(r.path, None)
    group.attrs["quarantine"] = q
    return n_ok, n_bad


def finalize_ingestion(store, results: Iterable[FrameResult]) -> dict:
    """Record the writers' quarantines and the new content version; return a summary dictionary."""
    group = open_store(store, "r+")
    return finish_ingestion(group, results, lambda: content_version(store), state_copy=True)


def finish_ingestion(group, results: Iterable[FrameResult], version, state_copy: bool = False) -> dict:
    """The end of any ingestion (frames or images): record quarantines, store the new content version
    (``version()`` computes it once the quarantines are recorded), save the one-chunk copy of the markers
    when asked (``state_copy``, the photometry store), and summarise."""
    n_ok, n_bad = record_results(group, results)
    group.attrs["content_version"] = current = version()
    state = group["frame_state"][:]
    if state_copy:
        _save_state_copy(group, state, current)
    return {
        "content_version": current,
        "frames_in_store": int(state.size),
        "frames_ingested_total": int((state == INGESTED).sum()),
        "frames_quarantined_total": len(group.attrs["quarantine"]),
        "ingested_now": n_ok,
        "quarantined_now": n_bad,
    }


def frame_table(store):
    """Every frame the store knows of (ingested, quarantined, pending) plus files quarantined unread.

    Returns
    -------
    astropy.table.Table
        Columns ``frame_id``, ``path``, ``state`` ('ingested', 'quarantined', 'pending'), ``reason``,
        ``time``; used for the INMASTER HDU and the run reports.
    """
    from astropy.table import Table

    group = open_store(store)
    q = group.attrs.get("quarantine", {})
    n_frames = committed_sizes(group)[0]
    states, arrays = _read_states(group, ("frame_path", "time"))
    states = states[:n_frames]
    frame_ids = arrays["frame_id"][:n_frames].tolist()
    paths = arrays["frame_path"][:n_frames].tolist()
    times = arrays["time"][:n_frames].tolist()
    state_names = np.array(["pending", "ingested", "quarantined"])[states].tolist()
    reasons = [""] * n_frames
    for slot in np.flatnonzero(states == QUARANTINED).tolist():
        reasons[slot] = q.get(paths[slot], {}).get("reason", "")
    in_store = set(paths)
    for path, rec in q.items():
        if path not in in_store:
            frame_ids.append(str(rec.get("frame_id") or os.path.basename(path)))
            paths.append(path)
            state_names.append("quarantined")
            reasons.append(rec["reason"])
            times.append(math.nan)
    columns = [frame_ids, paths, state_names, reasons]
    return Table(
        [np.array(c, dtype=str) if c else np.zeros(0, dtype=str) for c in columns]
        + [np.array(times, dtype=float)],
        names=("frame_id", "path", "state", "reason", "time"),
    )


def summary_json(summary: dict) -> str:
    """Stable JSON of a summary dictionary (for logs and artifacts)."""
    return json.dumps(summary, indent=2, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------------
# One run at a time per store
# --------------------------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # lock path -> [open file, depth]; re-entrant within one process
_HELD_GUARD = threading.Lock()


def lock_path(store) -> str | None:
    """The lock file of a local store (``<store>.lock`` beside it); None for remote URLs."""
    url = _url(store)
    if "://" in url and not url.startswith("file://"):
        return None
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(path.rstrip("/")) + ".lock"


@contextlib.contextmanager
def store_lock(store, timeout: float | None = 0.0, poll: float = 0.2):
    """Hold the store's run lock: one flow run writes to a store at a time.

    An OS file lock (``flock``) on ``<store>.lock``: the kernel releases it when the holder dies, even by
    SIGKILL, so a crashed run never leaves a stale lock. Re-entrant within a process (the master flow
    holds it while its ingestion subflow takes it again). Remote fsspec stores are not locked: run one
    flow per remote store at a time.

    Parameters
    ----------
    store : str or os.PathLike
        The store.
    timeout : float or None
        Seconds to wait for another run to finish: 0 refuses at once, None waits for ever.

    Raises
    ------
    StoreError
        When another run holds the lock after ``timeout`` seconds.
    """
    path = lock_path(store)
    if path is None:
        yield
        return
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise StoreError(
                    f"{_url(store)}: another photref run is using this store ({holder}); "
                    "wait for it to finish or pass a lock timeout"
                ) from None
            time.sleep(poll)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    handle.flush()
    with _HELD_GUARD:
        _HELD[path] = [handle, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            entry = _HELD[path]
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _HELD[path]
        if last:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


def store_from_arrays(
    store,
    source_id: np.ndarray,
    frame_id: Sequence[str],
    time: np.ndarray | None = None,
    in_catalog: np.ndarray | None = None,
    n_photometries: int = 1,
    dtype="f8",
    frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK,
    fill=None,
) -> zarr.Group:
    """Create a store of the given axes directly (no frame files): for benchmarks, tests and imports.

    Parameters
    ----------
    store : str or os.PathLike
        Where to create it (must not hold a photref store yet).
    source_id, frame_id, time, in_catalog
        The axes; ``time`` defaults to NaN, ``in_catalog`` to True.
    n_photometries, dtype, frames_per_chunk
        As for :func:`plan_ingestion`.
    fill : callable, optional
        ``fill(f0, f1) -> (mag, mag_err)`` giving frames f0..f1-1 as arrays of shape
        (f1 - f0, nsources, P); called once per frame chunk, so memory stays at one chunk row. The frames
        are marked ingested as they are written.

    Returns
    -------
    zarr.Group
    """
    url = _url(store)
    if store_exists(url):
        raise StoreError(f"{url}: a photref store exists there already")
    group = _create_store(url, n_photometries, dtype, frames_per_chunk)
    n_src, n_frames = len(source_id), len(frame_id)
    source_chunk = _source_axis_chunking(group, n_src)
    _create_data_arrays(
        group, (n_frames, n_src, n_photometries), (frames_per_chunk, source_chunk, n_photometries), dtype
    )
    for name in ("source_id", "in_catalog"):
        group[name].resize((n_src,))
    for name in _FRAME_META + ("frame_state",):
        group[name].resize((n_frames,))
    group["source_id"][:] = np.asarray(source_id, dtype=np.uint64)
    group["in_catalog"][:] = True if in_catalog is None else np.asarray(in_catalog, bool)
    group["frame_id"][:] = np.asarray(frame_id, dtype=np.dtypes.StringDType())
    group["frame_path"][:] = np.full(n_frames, "", dtype=np.dtypes.StringDType())
    if time is not None:
        group["time"][:] = np.asarray(time, dtype=np.float64)
    if fill is not None:
        for f0 in range(0, n_frames, frames_per_chunk):
            f1 = min(f0 + frames_per_chunk, n_frames)
            mag, mag_err = fill(f0, f1)
            group["mag"][f0:f1] = mag
            group["mag_err"][f0:f1] = mag_err
            group["frame_state"][f0:f1] = INGESTED
    group.attrs["axes"] = {"frames": n_frames, "sources": n_src}
    group.attrs["content_version"] = version = content_version(url)
    _save_state_copy(group, group["frame_state"][:], version)
    return group


def add_photometry(
    store,
    frame_id: Sequence[str],
    source_id: np.ndarray,
    mag: np.ndarray,
    mag_err: np.ndarray,
    name: str,
    time: np.ndarray | None = None,
) -> dict:
    """Add one photometry (e.g. PSF magnitudes from the PRF flow) to the photometry store.

    The photometry axis grows by one; values go to the frames (matched by FRAMEID) and sources (by id)
    the store has, and the others are reported, not added. A store that does not exist yet is created
    with these frames and sources (P = 1). Frame files ingested later fill only the photometries files
    carry (``n_file_photometries``); the added one stays NaN for them until it is added again.

    Parameters
    ----------
    store : str or os.PathLike
        The photometry store (its root group).
    frame_id : sequence of str
        FRAMEID of each row of ``mag``.
    source_id : array_like
        Source id of each column of ``mag``.
    mag, mag_err : numpy.ndarray
        (frames, sources) magnitudes and errors (NaN where missing).
    name : str
        Name of the photometry (recorded in the ``photometry_names`` attribute).
    time : array_like, optional
        Frame times (JD), used only when the store is created.

    Returns
    -------
    dict
        ``photometry`` (the index of the photometry; a name already present is replaced in place),
        ``frames_matched``, ``frames_unknown``,
        ``sources_matched``, ``sources_unknown``.
    """
    url = _url(store)
    frame_id = [str(f) for f in frame_id]
    source_id = np.asarray(source_id)
    if source_id.dtype.kind not in "iu":  # ids through a float lose digits: refuse, never round
        raise ValueError(f"source_id must be integers, not {source_id.dtype}")
    source_id = source_id.astype(np.uint64)
    mag = np.asarray(mag, dtype=np.float64)
    mag_err = np.asarray(mag_err, dtype=np.float64)
    if not store_exists(url):
        order = np.argsort(source_id)
        group = store_from_arrays(
            url,
            source_id[order],
            frame_id,
            time=time,
            n_photometries=1,
            fill=lambda f0, f1: (mag[f0:f1, order, None], mag_err[f0:f1, order, None]),
        )
        group.attrs.update({"n_file_photometries": 0, "photometry_names": [name]})
        group.attrs["content_version"] = content_version(url)
        return {
            "photometry": 0,
            "frames_matched": len(frame_id),
            "frames_unknown": 0,
            "sources_matched": int(source_id.size),
            "sources_unknown": 0,
        }
    group = open_store(url, "r+")
    n_frames, n_src, n_phot = group["mag"].shape
    names = list(group.attrs.get("photometry_names", [f"file {i}" for i in range(n_phot)]))
    slot = {str(f): k for k, f in enumerate(group["frame_id"][:])}
    ids = group["source_id"][:]
    sorter = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[sorter], source_id), 0, max(ids.size - 1, 0))
    known_src = ids[sorter][pos] == source_id if ids.size else np.zeros(source_id.size, bool)
    cols = sorter[pos[known_src]]
    rows = [(slot[f], i) for i, f in enumerate(frame_id) if f in slot]
    if name in names:  # the same photometry again (e.g. a new PRF run): replace it in place
        index = names.index(name)
    else:
        index = n_phot
        names.append(name)
        for arr in (group["mag"], group["mag_err"]):
            arr.resize((n_frames, n_src, n_phot + 1))
    fpc = group["mag"].chunks[0]
    by_chunk: dict[int, list] = {}
    for s, i in rows:
        by_chunk.setdefault(s // fpc, []).append((s, i))
    for chunk_rows in by_chunk.values():
        lo = min(s for s, _ in chunk_rows)
        hi = max(s for s, _ in chunk_rows) + 1
        for arr, values in ((group["mag"], mag), (group["mag_err"], mag_err)):
            block = np.full((hi - lo, n_src), np.nan)
            for s, i in chunk_rows:
                block[s - lo, cols] = values[i, known_src]
            arr[lo:hi, :, index] = block
    group.attrs.update(
        {
            "n_photometries": len(names),
            "n_file_photometries": group.attrs.get("n_file_photometries", n_phot),
            "photometry_names": names,
            "photometry_revision": int(group.attrs.get("photometry_revision", 0)) + 1,
        }
    )
    group.attrs["content_version"] = content_version(url)
    return {
        "photometry": index,
        "frames_matched": len(rows),
        "frames_unknown": len(frame_id) - len(rows),
        "sources_matched": int(known_src.sum()),
        "sources_unknown": int((~known_src).sum()),
    }
