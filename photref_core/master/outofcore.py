"""Statistics out of core (SPEC 3): source blocks of the store's arrays through dask, in bounded memory.

Every (source, photometry) pair is computed independently (:mod:`.stats`), so cutting the sources into
blocks changes nothing in the numbers: :func:`source_statistics_dask` equals
:func:`~.stats.source_statistics` exactly, with any chunking and any number of workers.
"""

from __future__ import annotations

import numbers
import os
from typing import TYPE_CHECKING

import numpy as np

# The statistics' own kernels, shared within this subpackage (the block kernel is the in-memory one).
from .stats import (
    _KEYS,
    STATISTIC_NAMES,
    RejectionParameters,
    _check_params,
    _check_shapes,
    _dataset,
    _statistics_arrays,
    source_statistics,
)

if TYPE_CHECKING:  # xarray (and pandas under it) costs ~0.35 s to import: only where it is used
    import xarray as xr

__all__ = ["DEFAULT_BLOCK_BYTES", "DEFAULT_BLOCK_MIB", "source_statistics_dask"]

DEFAULT_BLOCK_MIB = 64
"""Default size of one source block of one input array in :func:`source_statistics_dask`, in MiB."""
DEFAULT_BLOCK_BYTES = DEFAULT_BLOCK_MIB * 2**20


def _block_statistics(mag_block, err_block, params: RejectionParameters) -> np.ndarray:
    """One source block (all frames): the ten statistics stacked along a new first axis, as float64."""
    stats_mag, stats_err = _statistics_arrays(mag_block, err_block, params)
    out = np.empty((len(STATISTIC_NAMES),) + stats_mag["center"].shape)
    for i, key in enumerate(_KEYS):
        out[i] = stats_mag[key]
        out[len(_KEYS) + i] = stats_err[key]
    return out


def _plan_blocks(source_chunks, block: int) -> list[tuple[int, int]]:
    """Source blocks ``(start, stop)`` of at most ``block`` sources, in order, following the input chunks.

    Consecutive whole input chunks are merged up to ``block`` sources, so no input chunk is read by two
    blocks; an input chunk larger than ``block`` is cut into nearly equal pieces (each piece re-reads it).
    """
    blocks = []
    pos = pending = 0  # pending whole chunks: [pending, pos)
    for size in source_chunks:
        size = int(size)
        if size <= block:
            if pos + size - pending > block:
                blocks.append((pending, pos))
                pending = pos
        else:
            if pos > pending:
                blocks.append((pending, pos))
            pieces = -(-size // block)
            edges = [pos + size * k // pieces for k in range(pieces + 1)]
            blocks.extend(zip(edges[:-1], edges[1:], strict=True))
            pending = pos + size
        pos += size
    if pos > pending:
        blocks.append((pending, pos))
    return blocks


def _dask_worker_count() -> int:
    """Threads of the active dask scheduler: a distributed client's, ``num_workers``, or the CPU count."""
    import dask
    from dask.base import get_scheduler
    from dask.local import get_sync

    scheduler = get_scheduler()
    nthreads = getattr(getattr(scheduler, "__self__", None), "nthreads", None)
    if callable(nthreads):
        try:
            return max(1, int(sum(nthreads().values())))
        except Exception:  # a scheduler without the usual API: fall back to the local guess
            pass
    if scheduler is get_sync:
        return 1
    return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def source_statistics_dask(
    mag,
    mag_err,
    params: RejectionParameters | None = None,
    source_ids=None,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    blocks_at_once: int | None = None,
) -> xr.Dataset:
    """Out-of-core :func:`source_statistics` over dask arrays, e.g. straight from the zarr store.

    The sources are cut into blocks; each block is rechunked to hold every frame (and every photometry)
    of its sources, and the in-memory computation runs on it, with whatever dask scheduler is active
    (threads by default, or a ``distributed`` client). Each (source, photometry) pair is computed
    independently, so the results are identical to :func:`source_statistics` whatever the chunking and
    the number of workers.

    Memory: the blocks are computed in rounds of ``blocks_at_once`` blocks (one dask computation per
    round), so the peak memory is about ``blocks_at_once`` x 6 x ``block_bytes`` (a block of both inputs,
    their concatenation and the sorted copies), whatever the store size. Block boundaries follow the
    input source chunks: consecutive whole chunks are merged up to the budget, so each input chunk is
    read once; a chunk wider than a block (e.g. a store chunked along frames only) is cut, and read again
    by every round that needs a piece of it.

    Parameters
    ----------
    mag, mag_err : dask.array.Array or array_like, shape (frame, source, photometry)
        For instance ``xarray.open_zarr(store)["mag"].data``; any chunking (``mag_err`` is aligned to the
        source chunks of ``mag``).
    params : RejectionParameters, optional
        Rejection parameters; the defaults when omitted.
    source_ids : array_like, shape (source,), optional
        Added as the ``source_id`` coordinate.
    block_bytes : int, default 64 MiB
        Size of one block of one input, as float64: a block holds at most
        ``max(1, block_bytes // (8 * nframes * nphotometries))`` sources.
    blocks_at_once : int, optional
        Blocks per round; by default the number of threads of the active scheduler (the ``num_workers``
        of the threaded scheduler, or the total threads of a distributed client).

    Returns
    -------
    xarray.Dataset
        As :func:`source_statistics`, computed (numpy-backed).
    """
    import dask
    import dask.array as da

    params = _check_params(params)
    for name, value in (("block_bytes", block_bytes), ("blocks_at_once", blocks_at_once)):
        bad = isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0
        if value is not None and bad:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(mag, da.Array):
        mag = np.asarray(mag)
    if not isinstance(mag_err, da.Array):
        mag_err = np.asarray(mag_err)
    mag, mag_err = _check_shapes(mag, mag_err)
    nframes, nsources, nphot = mag.shape
    if nframes == 0 or nsources == 0 or nphot == 0:
        empty = np.empty(mag.shape)
        return source_statistics(empty, empty, params, source_ids)
    block = int(max(1, min(nsources, block_bytes // (8 * nframes * nphot))))
    if not isinstance(mag, da.Array):  # in memory: any block boundaries are free
        mag = da.from_array(mag, chunks=(-1, block, -1))
    mag_err = da.asarray(mag_err)
    if mag_err.chunks[1] != mag.chunks[1]:
        mag_err = mag_err.rechunk({1: mag.chunks[1]})
    blocks = _plan_blocks(mag.chunks[1], block)
    at_once = blocks_at_once or _dask_worker_count()

    stacked = np.empty((len(STATISTIC_NAMES), nsources, nphot))
    whole = {0: -1, 1: -1, 2: -1}
    for first in range(0, len(blocks), at_once):
        todo = blocks[first : first + at_once]
        parts = []
        for start, stop in todo:
            part_mag = mag[:, start:stop, :].rechunk(whole, method="tasks")
            part_err = mag_err[:, start:stop, :].rechunk(whole, method="tasks")
            parts.append(
                da.map_blocks(
                    _block_statistics,
                    part_mag,
                    part_err,
                    params=params,
                    dtype=np.float64,
                    chunks=((len(STATISTIC_NAMES),), (stop - start,), (nphot,)),
                    meta=np.empty((0, 0, 0), dtype=np.float64),
                )
            )
        for (start, stop), result in zip(todo, dask.compute(*parts), strict=True):
            stacked[:, start:stop, :] = result
    stats = [{}, {}]
    for i, key in enumerate(_KEYS):
        for half in (0, 1):
            values = stacked[half * len(_KEYS) + i]
            stats[half][key] = values.astype(np.int64) if key.endswith("count") else values
    return _dataset(stats[0], stats[1], params, source_ids)
