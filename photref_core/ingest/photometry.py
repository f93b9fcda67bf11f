"""Frame photometry files -> the store (SPEC 1.1, 2): plan, write one frame chunk, finalise."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from ..errors import BadInputError, retry_transient
from ..store.frames import (
    FRAME_IDENTITY,
    FrameBatch,
    FrameResult,
    FrameRules,
    IngestionPlan,
    ScannedFrame,
    classify_files,
    finish_ingestion,
    index_frames,
    plan_frames,
    read_states,
)
from ..store.schema import (
    FRAME_META,
    INGESTED,
    QUARANTINED,
    SOURCE_COLUMNS_GROUP,
    committed_sizes,
    content_version,
    create_data_arrays,
    create_source_columns,
    create_store,
    frames_per_chunk_for,
    open_store,
    resize_source_columns,
    source_axis_chunking,
    source_column_names,
    store_exists,
    store_url,
)
from .readers import read_frame, read_frame_header, valid_measurements

__all__ = [
    "PhotometryRules",
    "finalize_ingestion",
    "ingest_batch",
    "ingestion_needed",
    "plan_ingestion",
]


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
    url = store_url(store)
    if not store_exists(url):
        return True
    group = open_store(url)
    n_frames, n_sources = committed_sizes(group)
    state, arrays = read_states(group, (*FRAME_IDENTITY, "source_id", "in_catalog"))
    frame_sizes = {state.size} | {arrays[name].size for name in ("frame_id", *FRAME_IDENTITY)}
    source_sizes = {arrays[name].size for name in ("source_id", "in_catalog")}
    if frame_sizes != {n_frames} or source_sizes != {n_sources}:
        return True  # a plan was killed half-way: the next plan cleans up
    known, _ = index_frames(state, arrays)
    quarantine_prev = dict(group.attrs.get("quarantine", {}))
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in frame_paths))
    _, to_scan, _, unreadable = classify_files(paths, known, quarantine_prev, strict=False)
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


class PhotometryRules(FrameRules):
    """The frame-photometry rules over :func:`~photref_core.store.frames.plan_frames`: every frame has the
    store's P, at least one row and (with a catalog) a star of the catalog; the source axis becomes the
    catalog ids plus every id seen in a usable frame."""

    def __init__(self, catalog, dtype, frames_per_chunk):
        self.catalog = catalog
        self.dtype = dtype
        self.frames_per_chunk = frames_per_chunk
        self.catalog_ids = (
            np.asarray(catalog["source_id"], dtype=np.uint64)
            if catalog is not None
            else np.zeros(0, np.uint64)
        )
        self.n_phot = None

    def scan(self, path):
        header = read_frame_header(path)
        return ScannedFrame(header.path, header.frame_id, header.time, header)

    def settle(self, group, scanned, n_paths):
        # Frame files carry the first n_file_photometries photometries; later ones (PSF photometry from the
        # PRF flow) are added by add_photometry.
        if group is not None:
            self.n_phot = group.attrs.get("n_file_photometries", group.attrs["n_photometries"])
            return
        counts = [s.header.n_photometries for s in scanned]
        if counts:
            values, freq = np.unique(counts, return_counts=True)
            self.n_phot = int(values[np.argmax(freq)])  # the majority decides P of a new store
        else:
            raise BadInputError(None, f"no readable frame among {n_paths} file(s); nothing to ingest")

    def problem(self, frame):
        header = frame.header
        if header.n_photometries != self.n_phot:
            return f"has {header.n_photometries} photometries, the store has {self.n_phot}"
        if header.source_id.size == 0:
            return "has no rows"
        if self.catalog is not None and not np.isin(header.source_id, self.catalog_ids).any():
            return "has no star of the catalog"
        return None

    def prepare(self, url, group, accepted):
        candidate = np.unique(np.concatenate([self.catalog_ids] + [f.header.source_id for f in accepted]))
        if group is None:
            fpc = self.frames_per_chunk or frames_per_chunk_for(
                candidate.size, self.n_phot, np.dtype(self.dtype).itemsize
            )
            group = create_store(url, self.n_phot, self.dtype, fpc)
        old_ids = group["source_id"][:]
        extra = np.setdiff1d(candidate, old_ids, assume_unique=True)
        self.n_sources = n_sources = old_ids.size + extra.size
        if extra.size:
            source_chunk = source_axis_chunking(group, n_sources)
            for name in ("mag", "mag_err"):
                arr = group[name]
                if arr.shape[1] == 0 and arr.chunks[1] != source_chunk:
                    # First sources of a new store: the source chunking is decided now, from their number.
                    create_data_arrays(
                        group, arr.shape, (arr.chunks[0], source_chunk, arr.chunks[2]), arr.dtype
                    )
                    arr = group[name]
                arr.resize((arr.shape[0], n_sources, arr.shape[2]))  # P includes added photometries
            for name in ("source_id", "in_catalog"):
                group[name].resize((n_sources,))
            group["source_id"][old_ids.size :] = extra
            resize_source_columns(group, n_sources=n_sources)
        if self.catalog is not None:
            group["in_catalog"][:] = np.isin(np.concatenate([old_ids, extra]), self.catalog_ids)
        # Extra per-source columns (x, y, ...): the union over the frames, created before any writer.
        create_source_columns(group, {name for f in accepted for name in f.header.extra_columns})
        return group

    def resize_frames(self, group, n_frames):
        for name in ("mag", "mag_err"):
            arr = group[name]
            arr.resize((n_frames, arr.shape[1], arr.shape[2]))
        for name in FRAME_META + ("frame_state",):
            group[name].resize((n_frames,))
        resize_source_columns(group, n_frames=n_frames)

    def drop_uncommitted(self, group):
        n_frames, n_sources = committed_sizes(group)
        if group["frame_id"].shape[0] == n_frames and group["source_id"].shape[0] == n_sources:
            return
        for name in ("mag", "mag_err"):
            group[name].resize((n_frames, n_sources, group[name].shape[2]))
        for name in ("source_id", "in_catalog"):
            group[name].resize((n_sources,))
        for name in FRAME_META + ("frame_state",):
            group[name].resize((n_frames,))
        resize_source_columns(group, n_frames, n_sources)

    def data_array(self, group):
        return group["mag"]

    def finish_plan(self, group, n_frames):
        if self.catalog is not None and "path" in self.catalog.meta:
            group.attrs["catalog"] = self.catalog.meta["path"]
        return {"frames": int(n_frames), "sources": int(group["source_id"].shape[0])}


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

    :func:`~photref_core.store.frames.plan_frames` with :class:`PhotometryRules`: frames already ingested
    from an unchanged file are skipped without being opened; the others are scanned (header, source ids,
    P) and bad ones quarantined with the reason. The source axis becomes the catalog ids plus every id
    seen in a usable frame; the frame axis grows by the new frames.

    Parameters
    ----------
    store : str or os.PathLike
        Store directory or fsspec URL (created when missing).
    frame_paths : iterable of path
        Frame photometry files (SPEC 1.1).
    catalog : astropy.table.Table, optional
        From :func:`photref_core.catalog.read_catalog`. Without one, no frame is quarantined for having no
        known star and ``in_catalog`` stays False.
    dtype : str
        Float type of ``mag``/``mag_err`` when the store is created (float64 keeps the input exactly).
    frames_per_chunk : int, optional
        Frames per chunk when the store is created; one writer task per chunk. Default: chunk rows of
        about 2 MiB (:func:`~photref_core.store.schema.frames_per_chunk_for`).
    strict : bool
        Raise on the first bad frame instead of quarantining it.
    scan_workers : int
        Threads for the header pre-pass.

    Returns
    -------
    IngestionPlan
    """
    url = store_url(store)
    group = open_store(url, "r+") if store_exists(url) else None
    rules = PhotometryRules(catalog, dtype, frames_per_chunk)
    plan = plan_frames(url, group, frame_paths, rules, strict=strict, scan_workers=scan_workers)
    plan.n_photometries = rules.n_phot
    return plan


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
    column_arrays = {name: group[SOURCE_COLUMNS_GROUP][name] for name in source_column_names(group)}
    columns = {name: array[lo:hi] for name, array in column_arrays.items()}
    states = group["frame_state"][lo:hi]
    results = []
    for slot, path, frame_id in zip(batch.slots, batch.paths, batch.frame_ids, strict=True):
        k = slot - lo
        mag[k, :, :n_file_phot] = np.nan
        err[k, :, :n_file_phot] = np.nan
        for values in columns.values():
            values[k] = np.nan
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
            for name, values in frame.columns.items():
                if name not in columns:
                    raise BadInputError(path, f"has column {name!r}, which it did not have when planned")
                columns[name][k, cols] = values
            states[k] = INGESTED
            results.append(FrameResult(path, frame_id, slot, INGESTED, None, int(good.sum())))
        except BadInputError as exc:
            if strict:
                raise
            mag[k] = np.nan  # a quarantined frame keeps no photometry at all
            err[k] = np.nan
            for values in columns.values():
                values[k] = np.nan
            states[k] = QUARANTINED
            results.append(FrameResult(path, frame_id, slot, QUARANTINED, exc.problem, 0))
    # Data first, marker last: a frame is ingested only once its rows are written.
    dtype = mag_arr.dtype
    mag_arr[lo:hi] = mag.astype(dtype, copy=False)
    err_arr[lo:hi] = err.astype(dtype, copy=False)
    for name, array in column_arrays.items():
        array[lo:hi] = columns[name].astype(array.dtype, copy=False)
    group["frame_state"][lo:hi] = states
    return results


def finalize_ingestion(store, results: Iterable[FrameResult]) -> dict:
    """Record the writers' quarantines and the new content version; return a summary dictionary."""
    group = open_store(store, "r+")
    return finish_ingestion(group, results, lambda: content_version(store), state_copy=True)
