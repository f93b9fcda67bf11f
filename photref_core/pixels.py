"""Pixel frames in the store and the PRF steps over them (SPEC 1.3, 2, 6).

Images live in the group ``prf`` of the field's store (``xr.open_zarr(store, group="prf")``)::

    flux, flux_err   (frame, pixel)  float32, the image flattened (row-major, ``image_shape`` in attrs)
    mask             (frame, pixel)  bool, True = bad pixel (MASK HDU nonzero, non-finite data or error)
    frame_id, time, frame_path, frame_mtime_ns, frame_size, wcs_header   (frame,)
    frame_state      (frame,)        0 pending, 1 ingested, 2 quarantined

All frames share one pixel grid; each keeps its own WCS header (dithered frames later). The ingestion
follows the photometry's rules: the planner fixes the axes before the fan-out, one writer per frame chunk
writes data then markers, unchanged files are skipped. Results sit beside the images:
``prf/model-<key>`` (the shape model's arrays) and ``prf/fluxes-<key>`` (flux, flux_err, flag per frame
and source; one writer per frame chunk).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from .errors import BadInputError, StoreError
from .io import _frame_id_from_meta, _time_from_meta, is_transient, read_catalog, retry_transient
from .prf import PRFModel, PRFParameters, default_error
from .store import (
    INGESTED,
    QUARANTINED,
    SCHEMA_VERSION,
    FrameBatch,
    FrameResult,
    IngestionPlan,
    assign_slots,
    create_frame_axis,
    cut_batches,
    file_identity,
    finish_ingestion,
    hash_arrays,
    write_frame_axis,
)

GROUP = "prf"
_META = ("frame_id", "time", "frame_path", "frame_mtime_ns", "frame_size", "wcs_header")


def read_image(path, header_only: bool = False) -> dict:
    """Read one pixel frame (SPEC 1.3).

    Returns
    -------
    dict
        ``frame_id``, ``time`` (JD), ``shape``, ``wcs_header`` (str) and, unless ``header_only``,
        ``flux``, ``flux_err`` (from the ``ERR`` HDU, else sqrt(max(flux,0)/GAIN + RDNOISE^2)) and
        ``mask`` (True = bad: ``MASK`` nonzero, non-finite flux or error, error <= 0), as float32/bool.

    Raises
    ------
    BadInputError
        Unreadable file, no image, no celestial WCS, ERR or MASK of another shape.
    """
    import warnings

    path = os.fspath(path)
    if not os.path.exists(path):
        raise BadInputError(path, "file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            with fits.open(path, memmap=False) as hdul:
                image = next(
                    (h for h in hdul if h.is_image and h.data is not None and h.data.ndim == 2), None
                )
                if image is None:
                    raise BadInputError(path, "no 2-d image in the primary HDU or an image extension")
                header = image.header
                meta = dict(hdul[0].header)
                meta.update(header)
                wcs = WCS(header)
                if not wcs.has_celestial:
                    raise BadInputError(path, "the image header has no celestial WCS")
                out = {
                    "frame_id": _frame_id_from_meta(meta, path),
                    "time": _time_from_meta(meta, path),
                    "shape": tuple(int(n) for n in image.data.shape),
                    "wcs_header": wcs.celestial.to_header_string(relax=True),
                }
                if header_only:
                    return out
                flux = np.asarray(image.data, dtype=np.float32)
                names = [h.name for h in hdul]
                if "ERR" in names:
                    err = np.asarray(hdul["ERR"].data, dtype=np.float32)
                else:
                    gain = float(meta.get("GAIN", 1.0))
                    rdnoise = float(meta.get("RDNOISE", 0.0))
                    err = default_error(flux, gain, rdnoise).astype(np.float32)
                bad = np.zeros(flux.shape, bool)
                if "MASK" in names:
                    bad = np.asarray(hdul["MASK"].data) != 0
                for name, arr in (("ERR", err), ("MASK", bad)):
                    if arr.shape != flux.shape:
                        raise BadInputError(path, f"{name} HDU has shape {arr.shape}, the image {flux.shape}")
    except BadInputError:
        raise
    except OSError as exc:
        if is_transient(exc):
            raise
        raise BadInputError(path, f"cannot read the image ({exc})") from exc
    except Exception as exc:
        raise BadInputError(path, f"cannot read the image ({type(exc).__name__}: {exc})") from exc
    with np.errstate(invalid="ignore"):
        bad |= ~np.isfinite(flux) | ~np.isfinite(err) | ~(err > 0)
    out.update(flux=flux, flux_err=err, mask=bad)
    return out


def _open(store, mode="r") -> zarr.Group:
    root = zarr.open_group(os.fspath(store), mode=mode)
    try:
        group = root[GROUP]
    except KeyError as exc:
        raise StoreError(f"{os.fspath(store)}: no pixel frames in this store (group '{GROUP}')") from exc
    if group.attrs.get("photref_schema") != SCHEMA_VERSION:
        raise StoreError(f"{os.fspath(store)}: pixel group schema {group.attrs.get('photref_schema')!r}")
    return group


def plan_image_ingestion(
    store, paths: Iterable, frames_per_chunk: int = 8, strict: bool = False
) -> IngestionPlan:
    """Fix the pixel group's axes for the new or changed images and cut them into writer batches."""
    url = os.fspath(store)
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
    root = zarr.open_group(url, mode="a")
    group = root[GROUP] if GROUP in root else None
    if group is not None and "axes" in group.attrs:
        # A plan killed between its resize and its metadata write left phantom slots: drop them.
        n_committed = int(group.attrs["axes"]["frames"])
        if group["frame_id"].shape[0] != n_committed:
            for name in ("flux", "flux_err", "mask"):
                group[name].resize((n_committed, group[name].shape[1]))
            for name in _META + ("frame_state",):
                group[name].resize((n_committed,))
    known, slot_of_id = {}, {}
    if group is not None:
        meta = {n: group[n][:] for n in _META + ("frame_state",)}
        for slot, fid in enumerate(meta["frame_id"]):
            slot_of_id[str(fid)] = slot
            known[str(meta["frame_path"][slot])] = (
                int(meta["frame_state"][slot]),
                int(meta["frame_mtime_ns"][slot]),
                int(meta["frame_size"][slot]),
            )
    skipped, scan, quarantined, identities = [], [], {}, {}
    for path in paths:
        try:
            identities[path] = file_identity(path)
        except FileNotFoundError:
            quarantined[path] = {"frame_id": None, "reason": "file does not exist"}
            continue
        prev = known.get(path)
        if prev and prev[0] in (INGESTED, QUARANTINED) and prev[1:] == identities[path]:
            skipped.append(path)
        else:
            scan.append(path)

    def header(path):
        try:
            return read_image(path, header_only=True)
        except BadInputError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=2) as pool:
        headers = list(pool.map(header, scan))
    shape = tuple(group.attrs["image_shape"]) if group is not None else None
    if shape is None:
        shapes = [h["shape"] for h in headers if isinstance(h, dict)]
        if not shapes:
            raise BadInputError(None, f"no readable image among {len(paths)} file(s)")
        shape = max(set(shapes), key=shapes.count)
    good, seen = [], {}
    for path, h in zip(scan, headers, strict=True):
        reason = None
        if isinstance(h, BadInputError):
            reason = h.problem
        elif h["shape"] != shape:
            reason = f"image shape {h['shape']} differs from the field's {shape}"
        elif h["frame_id"] in seen:
            reason = f"FRAMEID {h['frame_id']!r} is also used by {seen[h['frame_id']]}"
        if reason:
            if strict:
                raise BadInputError(path, reason)
            quarantined[path] = {
                "frame_id": None if isinstance(h, BadInputError) else h["frame_id"],
                "reason": reason,
            }
            continue
        seen[h["frame_id"]] = path
        good.append((path, h))

    npix = shape[0] * shape[1]
    if group is None:
        group = root.create_group(GROUP)
        chunk_pix = int(min(npix, max(4096, 2**22 // (4 * frames_per_chunk))))
        for name, dtype, fill in (("flux", "f4", np.nan), ("flux_err", "f4", np.nan), ("mask", bool, True)):
            group.create_array(
                name,
                shape=(0, npix),
                chunks=(frames_per_chunk, chunk_pix),
                dtype=dtype,
                fill_value=fill,
                dimension_names=["frame", "pixel"],
                attributes={"coordinates": "frame_id time"},
            )
        create_frame_axis(group, frames_per_chunk, extra_strings=("wcs_header",))
        group.attrs.update(
            {
                "photref_schema": SCHEMA_VERSION,
                "image_shape": list(shape),
                "quarantine": {},
                "axes": {"frames": 0},
            }
        )
    n_old = group["frame_id"].shape[0]
    slots, next_slot = assign_slots([h["frame_id"] for _, h in good], slot_of_id, n_old)
    if next_slot != n_old:
        for name in ("flux", "flux_err", "mask"):
            group[name].resize((next_slot, npix))
        for name in _META + ("frame_state",):
            group[name].resize((next_slot,))
    write_frame_axis(
        group,
        slots,
        {
            "frame_id": [h["frame_id"] for _, h in good],
            "time": [h["time"] for _, h in good],
            "frame_path": [path for path, _ in good],
            "wcs_header": [h["wcs_header"] for _, h in good],
            "frame_mtime_ns": [identities[path][0] for path, _ in good],
            "frame_size": [identities[path][1] for path, _ in good],
        },
    )
    batches = cut_batches(
        slots, [path for path, _ in good], [h["frame_id"] for _, h in good], group["flux"].chunks[0]
    )
    group.attrs["axes"] = {"frames": int(next_slot)}  # last: the new frames count only now
    if quarantined:
        q = dict(group.attrs.get("quarantine", {}))
        q.update(quarantined)
        group.attrs["quarantine"] = q
    return IngestionPlan(
        store=url,
        batches=batches,
        skipped=skipped,
        quarantined=quarantined,
        n_frames=next_slot,
        n_sources=0,
        n_photometries=0,
    )


def ingest_image_batch(store, batch: FrameBatch, strict: bool = False) -> list[FrameResult]:
    """Write the images of one frame chunk (its only writer), then their markers."""
    group = _open(store, "r+")
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
    :func:`photref_core.store.finish_ingestion`."""
    group = _open(store, "r+")
    names = ("frame_id", "frame_state", "frame_mtime_ns", "frame_size")
    return finish_ingestion(group, results, lambda: hash_arrays(group, names))


def ingested_frames(store) -> np.ndarray:
    """Slots of the ingested images, in slot order."""
    return np.flatnonzero(_open(store)["frame_state"][:] == INGESTED)


def _load_images(group, slots):
    ny, nx = group.attrs["image_shape"]
    cube = {
        n: group[n].get_orthogonal_selection((slots, slice(None))).reshape(len(slots), ny, nx)
        for n in ("flux", "flux_err", "mask")
    }
    headers = group["wcs_header"][:]
    wcs = [WCS(fits.Header.fromstring(str(headers[s]))) for s in slots]
    return cube, wcs


def build_prf_model(store, catalog_path, params: PRFParameters, key: str) -> str:
    """Fit the field's shape model on its ingested images; store its arrays as ``prf/model-<key>``."""
    group = _open(store, "r+")
    slots = ingested_frames(store)
    if slots.size == 0:
        raise StoreError(f"{os.fspath(store)}: no ingested image to build a PRF model from")
    catalog = read_catalog(catalog_path)
    for column in ("ra", "dec", params.sources_flux_column):
        if column not in catalog.colnames:
            raise BadInputError(catalog_path, f"catalog has no '{column}' column (needed for PRF solving)")
    cube, wcs = _load_images(group, slots)
    model = PRFModel.build(
        cube["flux"],
        cube["flux_err"],
        wcs,
        np.asarray(catalog["ra"]),
        np.asarray(catalog["dec"]),
        np.asarray(catalog[params.sources_flux_column], dtype=float),
        source_ids=np.asarray(catalog["source_id"]).astype(np.int64),
        params=params,
        mask=cube["mask"],
    )
    name = f"model-{key}"
    if name in group:
        del group[name]
    out = group.create_group(name)
    scalars = {}  # 0-d values (JSON text, versions, norms) go to the attributes
    for k, v in model.to_arrays().items():
        v = np.asarray(v)
        if v.ndim == 0:
            scalars[k] = v.item()
        else:
            chunks = tuple(max(1, n) for n in v.shape)
            out.create_array(k, shape=v.shape, dtype=v.dtype, chunks=chunks)[...] = v
    out.attrs["scalars"] = scalars
    return f"{GROUP}/{name}"


def load_prf_model(store, model_group: str) -> PRFModel:
    """The shape model stored by :func:`build_prf_model`."""
    group = zarr.open_group(os.fspath(store), path=model_group, mode="r")
    arrays = {k: np.asarray(a[...]) for k, a in group.arrays()}
    arrays.update({k: np.array(v) for k, v in group.attrs["scalars"].items()})
    return PRFModel.from_arrays(arrays)


def create_flux_arrays(store, model_group: str, key: str) -> str:
    """Create ``prf/fluxes-<key>`` at full size (frames x sources) before the fit fan-out."""
    group = _open(store, "r+")
    model = zarr.open_group(os.fspath(store), path=model_group, mode="r")
    source_ids = np.asarray(model["source_id"][...])
    n_frames, fpc = group["frame_state"].shape[0], group["flux"].chunks[0]
    name = f"fluxes-{key}"
    if name in group:  # same model and same frames: keep the rows already fitted
        return f"{GROUP}/{name}"
    out = group.create_group(name)
    for var, dtype, fill in (("flux", "f8", np.nan), ("flux_err", "f8", np.nan), ("flag", "i4", 0)):
        out.create_array(
            var,
            shape=(n_frames, source_ids.size),
            chunks=(fpc, max(source_ids.size, 1)),
            dtype=dtype,
            fill_value=fill,
            dimension_names=["frame", "source"],
        )
    out.create_array("source_id", shape=source_ids.shape, dtype="i8", dimension_names=["source"])[:] = (
        source_ids
    )
    out.attrs["model_group"] = model_group
    return f"{GROUP}/{name}"


def frame_chunks(store) -> list[list[int]]:
    """Ingested image slots grouped by frame chunk: one fit task each (each owns its flux rows)."""
    fpc = _open(store)["flux"].chunks[0]
    slots = ingested_frames(store)
    chunks: dict[int, list[int]] = {}
    for s in slots:
        chunks.setdefault(int(s) // fpc, []).append(int(s))
    return list(chunks.values())


def fit_frame_chunk(store, model_group: str, flux_group: str, slots: list[int]) -> int:
    """Fit every source's flux in the frames ``slots`` (one frame chunk) and write their rows."""
    group = _open(store)
    model = load_prf_model(store, model_group)
    cube, wcs = _load_images(group, np.asarray(slots))
    result = model.fit(cube["flux"], cube["flux_err"], mask=cube["mask"], wcs=wcs)
    out = zarr.open_group(os.fspath(store), path=flux_group, mode="r+")
    lo, hi = min(slots), max(slots) + 1
    block = {n: out[n][lo:hi] for n in ("flux", "flux_err", "flag")}
    rows = np.asarray(slots) - lo
    block["flux"][rows], block["flux_err"][rows], block["flag"][rows] = (
        result.flux,
        result.flux_err,
        result.flag,
    )
    for n, v in block.items():
        out[n][lo:hi] = v
    return len(slots)


def flux_table(store, flux_group: str) -> Table:
    """Long-format fluxes of the ingested frames: one row per (frame, source), SPEC 6 output columns."""
    group = _open(store)
    out = zarr.open_group(os.fspath(store), path=flux_group, mode="r")
    slots = ingested_frames(store)
    ids = np.asarray(out["source_id"][...])
    frame_ids = group["frame_id"][:]
    flux = out["flux"].get_orthogonal_selection((slots, slice(None)))
    err = out["flux_err"].get_orthogonal_selection((slots, slice(None)))
    flag = out["flag"].get_orthogonal_selection((slots, slice(None)))
    table = Table()
    table["frame_id"] = np.repeat(np.asarray([str(frame_ids[s]) for s in slots]), ids.size)
    table["source_id"] = np.tile(ids, slots.size).astype(np.int64)
    table["flux"] = flux.ravel().astype(np.float64)
    table["flux_err"] = err.ravel().astype(np.float64)
    table["flag"] = flag.ravel().astype(np.int32)
    return table


def write_flux_table(store, flux_group: str, output, model_group: str | None = None) -> str:
    """Write the long-format flux FITS table atomically (temporary name, then rename)."""
    import tempfile

    table = flux_table(store, flux_group)
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    hdu = fits.table_to_hdu(table)
    hdu.name = "FLUXES"
    primary = fits.PrimaryHDU()
    primary.header["STORE"] = os.fspath(store)
    if model_group:
        primary.header["PRFMODEL"] = model_group
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=os.path.dirname(output)
    )
    os.close(fd)
    try:
        fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


def prf_model_key(store, params: PRFParameters, catalog_path) -> str:
    """Key of a shape model: the images ingested (content version), the parameters and the catalog file."""
    import hashlib

    version = _open(store).attrs.get("content_version", "")
    st = os.stat(catalog_path)
    text = json.dumps(
        [version, params.to_dict(), os.path.abspath(catalog_path), st.st_mtime_ns, st.st_size],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def add_psf_photometry(store, flux_group: str, zero_point: float = 25.0, name: str = "psf") -> dict:
    """Add the PRF fluxes to the field's photometry store as one more photometry (SPEC 6).

    mag = zero_point - 2.5 log10(flux), mag_err = 2.5 / ln(10) x flux_err / flux; fluxes that are not
    positive or are flagged give NaN (missing). Adding the same flux group twice changes nothing; a new
    PRF run replaces the photometry ``name`` in place.
    """
    from .store import add_photometry, store_exists
    from .store import open_store as open_photometry

    url = os.fspath(store)
    if store_exists(url) and open_photometry(url).attrs.get("photometry_origin", {}).get(name) == flux_group:
        return {"photometry": open_photometry(url).attrs["photometry_names"].index(name), "unchanged": True}
    group = _open(store)
    out = zarr.open_group(url, path=flux_group, mode="r")
    slots = ingested_frames(store)
    flux = out["flux"].get_orthogonal_selection((slots, slice(None)))
    err = out["flux_err"].get_orthogonal_selection((slots, slice(None)))
    flag = out["flag"].get_orthogonal_selection((slots, slice(None)))
    with np.errstate(divide="ignore", invalid="ignore"):
        good = (flux > 0) & np.isfinite(err) & (err > 0) & (flag == 0)
        mag = np.where(good, zero_point - 2.5 * np.log10(flux), np.nan)
        mag_err = np.where(good, 2.5 / np.log(10) * err / flux, np.nan)
    frame_ids = [str(f) for f in group["frame_id"].get_orthogonal_selection((slots,))]
    result = add_photometry(
        url,
        frame_ids,
        np.asarray(out["source_id"][...]),
        mag,
        mag_err,
        name,
        time=group["time"].get_orthogonal_selection((slots,)),
    )
    root = zarr.open_group(url, mode="r+")
    origin = dict(root.attrs.get("photometry_origin", {}))
    origin[name] = flux_group
    root.attrs["photometry_origin"] = origin
    return result
