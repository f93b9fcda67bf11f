"""Pixel frames -> the store's group ``prf`` (SPEC 1.3, 2): plan, write one frame chunk, finalise.

The layout is in :mod:`photref_core.store.schema`. All frames share one pixel grid; each keeps its own WCS
header (dithered frames later).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import zarr
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import BadInputError, StoreError, retry_transient
from ..keys import hash_arrays
from ..store.frames import (
    FrameBatch,
    FrameResult,
    FrameRules,
    IngestionPlan,
    ScannedFrame,
    finish_ingestion,
    plan_frames,
)
from ..store.schema import INGESTED, QUARANTINED, SCHEMA_VERSION, create_frame_axis, open_group
from .readers import read_image

__all__ = [
    "GROUP",
    "ImageRules",
    "finalize_image_ingestion",
    "ingest_image_batch",
    "ingested_frames",
    "load_images",
    "open_image_group",
    "plan_image_ingestion",
]


GROUP = "prf"
_META = ("frame_id", "time", "frame_path", "frame_mtime_ns", "frame_size", "wcs_header")
_PIXEL_ARRAYS = ("flux", "flux_err", "mask")


def open_image_group(store, mode="r") -> zarr.Group:
    """The pixel group of a store (checks its schema version)."""
    root = open_group(store, mode=mode)
    try:
        group = root[GROUP]
    except KeyError as exc:
        raise StoreError(f"{os.fspath(store)}: no pixel frames in this store (group '{GROUP}')") from exc
    if group.attrs.get("photref_schema") != SCHEMA_VERSION:
        raise StoreError(f"{os.fspath(store)}: pixel group schema {group.attrs.get('photref_schema')!r}")
    return group


class ImageRules(FrameRules):
    """The image rules over :func:`~photref_core.store.frames.plan_frames`: every image of a field has the
    same pixel grid (the store's, else the majority's shape); each keeps its own WCS header."""

    def __init__(self, frames_per_chunk: int):
        self.frames_per_chunk = frames_per_chunk
        self.shape = None

    def scan(self, path):
        header = read_image(path, header_only=True)
        return ScannedFrame(os.path.abspath(os.fspath(path)), header["frame_id"], header["time"], header)

    def settle(self, group, scanned, n_paths):
        if group is not None:
            self.shape = tuple(group.attrs["image_shape"])
            return
        shapes = [s.header["shape"] for s in scanned]
        if not shapes:
            raise BadInputError(None, f"no readable image among {n_paths} file(s)")
        self.shape = max(set(shapes), key=shapes.count)

    def problem(self, frame):
        if frame.header["shape"] != self.shape:
            return f"image shape {frame.header['shape']} differs from the field's {self.shape}"
        return None

    def prepare(self, url, group, accepted):
        if group is not None:
            return group
        root = open_group(url, mode="a")
        group = root.create_group(GROUP)
        npix = self.shape[0] * self.shape[1]
        fpc = self.frames_per_chunk
        chunk_pix = int(min(npix, max(4096, 2**22 // (4 * fpc))))
        for name, dtype, fill in (("flux", "f4", np.nan), ("flux_err", "f4", np.nan), ("mask", bool, True)):
            group.create_array(
                name,
                shape=(0, npix),
                chunks=(fpc, chunk_pix),
                dtype=dtype,
                fill_value=fill,
                dimension_names=["frame", "pixel"],
                attributes={"coordinates": "frame_id time"},
            )
        create_frame_axis(group, fpc, extra_strings=("wcs_header",))
        group.attrs.update(
            {
                "photref_schema": SCHEMA_VERSION,
                "image_shape": list(self.shape),
                "quarantine": {},
                "axes": {"frames": 0},
            }
        )
        return group

    def resize_frames(self, group, n_frames):
        for name in _PIXEL_ARRAYS:
            group[name].resize((n_frames, group[name].shape[1]))
        for name in _META + ("frame_state",):
            group[name].resize((n_frames,))

    def drop_uncommitted(self, group):
        # A plan killed between its resize and its metadata write left phantom slots: drop them.
        n_committed = int(group.attrs.get("axes", {}).get("frames", group["frame_id"].shape[0]))
        if group["frame_id"].shape[0] != n_committed:
            self.resize_frames(group, n_committed)

    def frame_values(self, accepted):
        return {"wcs_header": [f.header["wcs_header"] for f in accepted]}

    def data_array(self, group):
        return group["flux"]


def plan_image_ingestion(
    store, paths: Iterable, frames_per_chunk: int = 8, strict: bool = False, scan_workers: int = 2
) -> IngestionPlan:
    """Fix the pixel group's axes for the new or changed images and cut them into writer batches.

    :func:`~photref_core.store.frames.plan_frames` with :class:`ImageRules`: the same rules as the
    photometry (unchanged files skipped, unchanged quarantined files not re-read, any ``OSError`` on a
    file quarantines that file, a FRAMEID already ingested from another existing file is quarantined).
    """
    url = os.fspath(store)
    root = open_group(url, mode="a")
    group = root[GROUP] if GROUP in root else None
    return plan_frames(
        url, group, paths, ImageRules(frames_per_chunk), strict=strict, scan_workers=scan_workers
    )


def ingest_image_batch(store, batch: FrameBatch, strict: bool = False) -> list[FrameResult]:
    """Write the images of one frame chunk (its only writer), then their markers."""
    group = open_image_group(store, "r+")
    lo, hi = min(batch.slots), max(batch.slots) + 1
    flux, err, mask = (group[n][lo:hi] for n in ("flux", "flux_err", "mask"))
    states = group["frame_state"][lo:hi]
    results = []
    for slot, path, frame_id in zip(batch.slots, batch.paths, batch.frame_ids, strict=True):
        k = slot - lo
        try:
            image = retry_transient(read_image, path)
            if image["frame_id"] != frame_id:
                raise BadInputError(path, f"FRAMEID changed from {frame_id!r} to {image['frame_id']!r}")
            if image["mask"].all():
                raise BadInputError(path, "has no good pixel")
            flux[k], err[k], mask[k] = image["flux"].ravel(), image["flux_err"].ravel(), image["mask"].ravel()
            states[k] = INGESTED
            results.append(FrameResult(path, frame_id, slot, INGESTED, None, int((~image["mask"]).sum())))
        except BadInputError as exc:
            if strict:
                raise
            flux[k], err[k], mask[k] = np.nan, np.nan, True
            states[k] = QUARANTINED
            results.append(FrameResult(path, frame_id, slot, QUARANTINED, exc.problem, 0))
    group["flux"][lo:hi], group["flux_err"][lo:hi], group["mask"][lo:hi] = flux, err, mask
    group["frame_state"][lo:hi] = states
    return results


def finalize_image_ingestion(store, results: Iterable[FrameResult]) -> dict:
    """Record quarantines and the pixel group's content version; return the summary of
    :func:`photref_core.store.frames.finish_ingestion`."""
    group = open_image_group(store, "r+")
    names = ("frame_id", "frame_state", "frame_mtime_ns", "frame_size")
    return finish_ingestion(group, results, lambda: hash_arrays(group, names))


def ingested_frames(store) -> np.ndarray:
    """Slots of the ingested images, in slot order."""
    return np.flatnonzero(open_image_group(store)["frame_state"][:] == INGESTED)


def load_images(group, slots):
    """Images of the slots as (frames, ny, nx) cubes (flux, flux_err, mask) and their WCS."""
    ny, nx = group.attrs["image_shape"]
    cube = {
        n: group[n].get_orthogonal_selection((slots, slice(None))).reshape(len(slots), ny, nx)
        for n in ("flux", "flux_err", "mask")
    }
    headers = group["wcs_header"][:]
    wcs = [WCS(fits.Header.fromstring(str(headers[s]))) for s in slots]
    return cube, wcs
