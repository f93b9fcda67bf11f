"""Arrays -> the store, without frame files: a store made from arrays (benchmarks, tests,
imports), and one more photometry added to a store (the PRF flow's PSF magnitudes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

from ..errors import StoreError
from ..store.frames import retag_state_copy, save_state_copy
from ..store.schema import (
    DEFAULT_FRAMES_PER_CHUNK,
    FRAME_META,
    INGESTED,
    content_version,
    create_data_arrays,
    create_store,
    open_store,
    source_axis_chunking,
    store_exists,
    store_url,
)

__all__ = [
    "add_photometry",
    "store_from_arrays",
]


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
    url = store_url(store)
    if store_exists(url):
        raise StoreError(f"{url}: a photref store exists there already")
    group = create_store(url, n_photometries, dtype, frames_per_chunk)
    n_src, n_frames = len(source_id), len(frame_id)
    source_chunk = source_axis_chunking(group, n_src)
    create_data_arrays(
        group, (n_frames, n_src, n_photometries), (frames_per_chunk, source_chunk, n_photometries), dtype
    )
    for name in ("source_id", "in_catalog"):
        group[name].resize((n_src,))
    for name in FRAME_META + ("frame_state",):
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
    save_state_copy(group, group["frame_state"][:], version)
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
    url = store_url(store)
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
        previous = group.attrs.get("content_version")
        group.attrs["content_version"] = version = content_version(url)
        retag_state_copy(group, previous, version)
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
    previous = group.attrs.get("content_version")
    group.attrs["content_version"] = version = content_version(url)
    retag_state_copy(group, previous, version)
    return {
        "photometry": index,
        "frames_matched": len(rows),
        "frames_unknown": len(frame_id) - len(rows),
        "sources_matched": int(known_src.sum()),
        "sources_unknown": int((~known_src).sum()),
    }
