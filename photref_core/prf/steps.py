"""The PRF steps over the store (SPEC 6): shape model, flux arrays, per-frame-chunk fits, products.

Results sit beside the images (layout: :mod:`photref_core.store.schema`): ``prf/model-<key>`` (the shape
model's arrays) and ``prf/fluxes-<key>`` (flux, flux_err, flag per frame and source; one writer per frame
chunk). A model with a time model (:mod:`.timemodel`) fills both flux sets of :data:`FLUX_SETS` (the static
model's and the time model's) and each frame's ``transform`` (frame x term, pixels; the terms in the
array's ``terms`` attribute).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .. import keys
from .._atomic import atomic_path, atomic_writeto
from ..blas import blas_threads
from ..catalog import read_catalog
from ..errors import BadInputError, StoreError
from ..ingest.arrays import add_photometry
from ..ingest.images import GROUP, ingested_frames, load_images, open_image_group
from ..store.schema import open_group, open_store, store_exists, store_url
from .inputs import check_frames, wcs_key
from .model import PRFModel
from .parameters import PSF_ZERO_POINT, TRANSFORM_TERMS, PRFParameters
from .residuals import MeanFrame, ResidualMap, residual_map
from .solver import FLAG_LOW_COVERAGE, FLAG_SOLVE_FAILED

__all__ = [
    "FLUX_SETS",
    "add_psf_photometry",
    "build_prf_model",
    "create_flux_arrays",
    "fit_frame_chunk",
    "flux_set",
    "flux_sets_by_time",
    "flux_table",
    "flux_table_figures",
    "frame_chunks",
    "load_prf_model",
    "prf_model_key",
    "reference_residuals",
    "shared_prf_model",
    "source_table",
    "transform_table",
    "write_flux_table",
    "write_model_images",
]


#: The flux sets of a flux group, by name: their (flux, flux_err, flag) arrays. ``static``: the mean shape
#: at the WCS positions (what a run without a time model gives); ``time``: the time model's.
FLUX_SETS = {"static": ("flux", "flux_err", "flag"), "time": ("flux_time", "flux_err_time", "flag_time")}


def build_prf_model(store, catalog_path, params: PRFParameters, key: str) -> str:
    """Fit the field's shape model on its ingested images; store its arrays as ``prf/model-<key>``."""
    group = open_image_group(store, "r+")
    slots = ingested_frames(store)
    if slots.size == 0:
        raise StoreError(f"{os.fspath(store)}: no ingested image to build a PRF model from")
    catalog = read_catalog(catalog_path)
    for column in ("ra", "dec", params.sources_flux_column):
        if column not in catalog.colnames:
            raise BadInputError(catalog_path, f"catalog has no '{column}' column (needed for PRF solving)")
    cube, wcs = load_images(group, slots)
    times = np.asarray(group["time"].get_orthogonal_selection((slots,)), dtype=float)
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
        times=times,
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
    _store_metrics(out, model)
    build_id = out.attrs["build_id"] = uuid.uuid4().hex  # which build this is, for the processes' caches
    # The fit tasks of this process take the model as built: its geometry, model matrix and solve plan on
    # the reference WCS are made already (~4 s for 1,500 sources on 512x512).
    _share_model(store, f"{GROUP}/{name}", build_id, model)
    return f"{GROUP}/{name}"


#: The per-source metrics of a model (:meth:`PRFModel.get_psf_metrics`) kept in its group's ``metrics``.
METRICS = ("source_psf_fraction", "perturbed_ratio_mean", "perturbed_std")


def _store_metrics(group, model: PRFModel) -> None:
    """The model's PSF metrics (on the reference frame) as arrays of the model group's ``metrics`` group;
    the perturbed ones only with a time model (SPEC 6: ``None`` without)."""
    metrics = model.get_psf_metrics()
    out = group.create_group("metrics")
    for name in METRICS:
        values = getattr(metrics, name)
        if values is not None:
            arr = out.create_array(name, shape=values.shape, dtype="f8", dimension_names=["source"])
            arr[...] = np.asarray(values, dtype=np.float64)
    out.attrs["notes"] = metrics.notes


def source_table(store, model_group: str) -> Table:
    """Per source: ``source_id``, ``ra``, ``dec`` and the model's PSF metrics (:data:`METRICS`, those the
    model has), from the store."""
    group = open_group(store, path=model_group, mode="r")
    table = Table()
    table["source_id"] = np.asarray(group["source_id"][...]).astype(np.int64)
    table["ra"] = np.asarray(group["ra"][...], dtype=np.float64)
    table["dec"] = np.asarray(group["dec"][...], dtype=np.float64)
    table["ra"].unit = table["dec"].unit = "deg"
    if "metrics" in group:
        metrics = group["metrics"]
        for name in METRICS:
            if name in metrics:
                table[name] = np.asarray(metrics[name][...], dtype=np.float64)
    return table


def load_prf_model(store, model_group: str) -> PRFModel:
    """The shape model stored by :func:`build_prf_model`."""
    group = open_group(store, path=model_group, mode="r")
    arrays = {k: np.asarray(a[...]) for k, a in group.arrays()}
    arrays.update({k: np.array(v) for k, v in group.attrs["scalars"].items()})
    return PRFModel.from_arrays(arrays)


#: Shape models kept loaded per process by :func:`shared_prf_model` (each holds its geometry and solve plans:
#: the plan alone 151 MB for 1,500 sources on 512x512).
SHARED_MODELS = 2
_SHARED = OrderedDict()
_SHARED_LOCK = threading.RLock()


def shared_prf_model(store, model_group: str) -> PRFModel:
    """The stored model of :func:`build_prf_model`, loaded once per process and build.

    The fit tasks of a run share it, and with it the geometry, mean model and solve plan of each frame
    WCS (:class:`~.cache.FrameModels`, locked): the plan, the costliest part of a crowded field's fit
    (1-2 s for 1,500 sources on 512x512), is built by the first task and reused by every later one.
    A rebuilt model (a new ``build_id``) is loaded afresh.

    Parameters
    ----------
    store : str or os.PathLike
    model_group : str
        The model's group (``prf/model-<key>``).

    Returns
    -------
    PRFModel
        Shared: use it to fit, do not change it (its time model's per-frame state is not shareable:
        :func:`fit_frame_chunk` loads its own copy for that).
    """
    build = open_group(store, path=model_group, mode="r").attrs.get("build_id")
    key = (store_url(store), model_group)
    with _SHARED_LOCK:
        held = _SHARED.get(key)
        if held is not None and held[0] == build and build is not None:
            _SHARED.move_to_end(key)
            return held[1]
        model = load_prf_model(store, model_group)
        _share_model(store, model_group, build, model)
        return model


def _share_model(store, model_group: str, build_id, model: PRFModel) -> None:
    """Keep ``model`` as the process's shared one for its group and build (at most :data:`SHARED_MODELS`)."""
    key = (store_url(store), model_group)
    with _SHARED_LOCK:
        _SHARED[key] = (build_id, model)
        _SHARED.move_to_end(key)
        while len(_SHARED) > SHARED_MODELS:
            _SHARED.popitem(last=False)


def create_flux_arrays(store, model_group: str, key: str) -> str:
    """Create ``prf/fluxes-<key>`` at full size (frames x sources) before the fit fan-out: the static flux
    set, and with a time model its flux set and the per-frame ``transform``."""
    group = open_image_group(store, "r+")
    model = open_group(store, path=model_group, mode="r")
    source_ids = np.asarray(model["source_id"][...])
    n_frames, fpc = group["frame_state"].shape[0], group["flux"].chunks[0]
    name = f"fluxes-{key}"
    if name in group:  # same model and same frames: keep the rows already fitted
        return f"{GROUP}/{name}"
    out = group.create_group(name)
    time_kind = model.attrs["scalars"].get("time_kind")
    sets = ("static", "time") if time_kind else ("static",)
    for names in (FLUX_SETS[s] for s in sets):
        for var, dtype, fill in zip(names, ("f8", "f8", "i4"), (np.nan, np.nan, 0), strict=True):
            out.create_array(
                var,
                shape=(n_frames, source_ids.size),
                chunks=(fpc, max(source_ids.size, 1)),
                dtype=dtype,
                fill_value=fill,
                dimension_names=["frame", "source"],
            )
    if time_kind:
        terms = list(TRANSFORM_TERMS[time_kind])
        arr = out.create_array(
            "transform",
            shape=(n_frames, len(terms)),
            chunks=(fpc, len(terms)),
            dtype="f8",
            fill_value=np.nan,
            dimension_names=["frame", "term"],
        )
        arr.attrs["terms"] = terms
        arr.attrs["units"] = "pixel"
        out.attrs["time_model"] = time_kind
    out.create_array("source_id", shape=source_ids.shape, dtype="i8", dimension_names=["source"])[:] = (
        source_ids
    )
    out.attrs["model_group"] = model_group
    return f"{GROUP}/{name}"


def frame_chunks(store) -> list[list[int]]:
    """Ingested image slots grouped by frame chunk: one fit task each (each owns its flux rows)."""
    fpc = open_image_group(store)["flux"].chunks[0]
    slots = ingested_frames(store)
    chunks: dict[int, list[int]] = {}
    for s in slots:
        chunks.setdefault(int(s) // fpc, []).append(int(s))
    return list(chunks.values())


def fit_frame_chunk(
    store, model_group: str, flux_group: str, slots: list[int], blas_threads_per_task: int | None = None
) -> int:
    """Fit every source's flux in the frames ``slots`` (one frame chunk) and write their rows (both flux
    sets and the transforms when the model has a time model).

    The model is the process's shared one (:func:`shared_prf_model`); ``blas_threads_per_task`` limits
    BLAS while the chunk is fitted (:func:`photref_core.blas.blas_threads`; ``None``: the library's
    setting)."""
    slots = np.asarray(sorted(int(s) for s in slots))
    with blas_threads(blas_threads_per_task):
        _, _, results = _fit_chunk(store, model_group, slots)
    lo, hi = int(slots[0]), int(slots[-1]) + 1
    out = open_group(store, path=flux_group, mode="r+")
    for which, (order, result) in results.items():
        where = slots[order] - lo
        for name, values in zip(FLUX_SETS[which], (result.flux, result.flux_err, result.flag), strict=True):
            block = out[name][lo:hi]
            block[where] = values
            out[name][lo:hi] = block
        if which == "time":
            block = out["transform"][lo:hi]
            block[where] = result.transform
            out["transform"][lo:hi] = block
    return len(slots)


def _fit_chunk(store, model_group: str, slots, sets=None, return_model: bool = False):
    """Fit the frames ``slots`` (sorted) for the flux sets ``sets`` (default: every set the model has):
    ``(cube, wcs, {set: (order, result)})``, ``order`` the positions in ``slots`` of the result's frames
    (the time model fits frames in time order, each from the previous one; the static fit keeps the
    slots' order)."""
    group = open_image_group(store)
    model = shared_prf_model(store, model_group)
    if sets is None:
        sets = ("static", "time") if model.time_model is not None else ("static",)
    cube, wcs = load_images(group, slots)
    results = {}
    if "static" in sets:
        static = model.fit(
            cube["flux"],
            cube["flux_err"],
            mask=cube["mask"],
            wcs=wcs,
            time_model=False,
            return_model=return_model,
        )
        results["static"] = (np.arange(len(slots)), static)
    if "time" in sets:
        own = load_prf_model(store, model_group)  # its per-frame transform state is this task's alone
        times = np.asarray(group["time"].get_orthogonal_selection((slots,)), dtype=float)
        order = np.argsort(times, kind="stable")
        result = own.fit(
            cube["flux"][order],
            cube["flux_err"][order],
            mask=cube["mask"][order],
            wcs=[wcs[i] for i in order],
            times=times[order],
            return_model=return_model,
        )
        results["time"] = (order, result)
    return cube, wcs, results


def write_model_images(store, model_group: str, flux_group: str, path, fluxes: str | None = None) -> str:
    """Write every ingested frame's model image and residual image to one FITS file (SPEC 6's model image).

    Per frame, in slot order, two image HDUs with the frame's WCS and ``FRAMEID``: ``MODEL`` (sum over
    sources of flux x PRF, plus the background when fitted) and ``RESID`` (data - model, NaN on masked
    pixels); ``EXTVER`` numbers the frames from 1. The fits are redone a frame chunk at a time with the
    model image returned (the same fit as :func:`fit_frame_chunk`, so the same fluxes), and the HDUs
    appended to the file as they come: memory holds one chunk. Written atomically.

    Parameters
    ----------
    store : str or os.PathLike
    model_group, flux_group : str
    path : str or os.PathLike
        The FITS file (replaced).
    fluxes : {'static', 'time'}, optional
        The flux set whose model is written (:func:`flux_set`).

    Returns
    -------
    str
        The path written.
    """
    which = flux_set(store, flux_group, fluxes)
    frame_ids = open_image_group(store)["frame_id"]
    primary = fits.Header()
    primary["STORE"] = os.fspath(store)
    primary["PRFMODEL"] = model_group
    primary["FLUXSET"] = (which, "the model of the 'static' or the 'time' fluxes")
    primary["CONTENT"] = ("MODEL, RESID per frame", "data - model in RESID; EXTVER: frame number")
    number = 0
    with atomic_path(path) as tmp:
        fits.PrimaryHDU(header=primary).writeto(tmp)
        for chunk in frame_chunks(store):
            slots = np.asarray(sorted(chunk))
            cube, wcs, results = _fit_chunk(store, model_group, slots, (which,), return_model=True)
            order, result = results[which]
            for k, i in enumerate(order):
                number += 1
                header = wcs[i].to_header(relax=True)
                header["FRAMEID"] = str(frame_ids[int(slots[i])])
                header["EXTVER"] = number
                image = result.model[k]
                bad = cube["mask"][i] | ~np.isfinite(cube["flux"][i])
                resid = np.where(bad, np.nan, cube["flux"][i] - image)
                for name, data in (("MODEL", image), ("RESID", resid)):
                    header["EXTNAME"] = name
                    fits.append(tmp, data.astype(np.float32), header, verify=False)
    return os.path.abspath(os.fspath(path))


def reference_residuals(store, model_group: str) -> ResidualMap:
    """The chi image of the model's reference frame (:func:`~.residuals.residual_map`): the frame
    ``frame_index``, or the mean of the shape-model frames (``time_mask``) that share the reference WCS,
    as the build made it, read a frame chunk at a time."""
    group = open_image_group(store)
    model = shared_prf_model(store, model_group)
    slots = ingested_frames(store)
    shape = tuple(int(n) for n in group.attrs["image_shape"])
    averaged = model.params.frame_index == "mean"
    use = check_frames(model.params, slots.size)
    if not averaged:
        use = np.zeros(slots.size, bool)
        use[int(model.params.frame_index) % slots.size] = True
    position = {int(s): k for k, s in enumerate(slots)}
    reference = model.frames.entry()["key"]
    mean = MeanFrame(shape)
    for chunk in frame_chunks(store):
        chosen = np.asarray([s for s in sorted(chunk) if use[position[s]]], dtype=np.int64)
        if chosen.size == 0:
            continue
        cube, wcs = load_images(group, chosen)
        same = [k for k, w in enumerate(wcs) if not averaged or wcs_key(w, shape) == reference]
        if same:
            mean.add(cube["flux"][same], cube["flux_err"][same], cube["mask"][same])
    return residual_map(model, mean.epoch(model.wcs))


def flux_set(store, flux_group: str, fluxes: str | None = None) -> str:
    """The flux set to read: ``fluxes`` if given (checked), else ``time`` where the group has a time
    model's fluxes, ``static`` otherwise."""
    out = open_group(store, path=flux_group, mode="r")
    has_time = "time_model" in out.attrs
    if fluxes is None:
        return "time" if has_time else "static"
    if fluxes not in FLUX_SETS:
        raise ValueError(f"fluxes must be one of {sorted(FLUX_SETS)}, got {fluxes!r}")
    if fluxes == "time" and not has_time:
        raise StoreError(
            f"{os.fspath(store)}: {flux_group} has no time-model fluxes (run with the time model)"
        )
    return fluxes


def flux_table(store, flux_group: str, fluxes: str | None = None) -> Table:
    """Long-format fluxes of the ingested frames: one row per (frame, source), SPEC 6 output columns, from
    the flux set ``fluxes`` (:func:`flux_set`; its name in ``meta['FLUXSET']``)."""
    which = flux_set(store, flux_group, fluxes)
    group = open_image_group(store)
    out = open_group(store, path=flux_group, mode="r")
    slots = ingested_frames(store)
    ids = np.asarray(out["source_id"][...])
    frame_ids = group["frame_id"][:]
    flux, err, flag = (out[n].get_orthogonal_selection((slots, slice(None))) for n in FLUX_SETS[which])
    table = Table()
    table["frame_id"] = np.repeat(np.asarray([str(frame_ids[s]) for s in slots]), ids.size)
    table["source_id"] = np.tile(ids, slots.size).astype(np.int64)
    table["flux"] = flux.ravel().astype(np.float64)
    table["flux_err"] = err.ravel().astype(np.float64)
    table["flag"] = flag.ravel().astype(np.int32)
    table.meta["FLUXSET"] = which
    return table


#: Names of the flag bits of a flux table, for summaries.
FLAG_NAMES = {FLAG_LOW_COVERAGE: "low coverage", FLAG_SOLVE_FAILED: "solve failed"}


def flux_table_figures(table: Table) -> dict:
    """A flux table in a few figures: the median relative error ``flux_err / flux`` of the unflagged,
    positive fluxes, and how many (frame, source) values carry each flag bit.

    Parameters
    ----------
    table : astropy.table.Table
        A :func:`flux_table`.

    Returns
    -------
    dict
        ``median_relative_error`` (NaN when no value qualifies), ``flagged`` (values with any flag) and
        ``flag_counts`` (bit name -> count).
    """
    flux, err, flag = (np.asarray(table[c]) for c in ("flux", "flux_err", "flag"))
    good = (flag == 0) & np.isfinite(flux) & (flux > 0) & np.isfinite(err)
    median = float(np.median(err[good] / flux[good])) if good.any() else float("nan")
    counts = {name: int(((flag & bit) != 0).sum()) for bit, name in FLAG_NAMES.items()}
    return {"median_relative_error": median, "flagged": int((flag != 0).sum()), "flag_counts": counts}


def transform_table(store, flux_group: str) -> Table | None:
    """Per ingested frame: ``frame_id``, ``time`` and the time model's transform terms (pixels); ``None``
    when the flux group has no time model."""
    out = open_group(store, path=flux_group, mode="r")
    if "time_model" not in out.attrs:
        return None
    group = open_image_group(store)
    slots = ingested_frames(store)
    transform = out["transform"].get_orthogonal_selection((slots, slice(None)))
    table = Table()
    table["frame_id"] = [str(f) for f in group["frame_id"].get_orthogonal_selection((slots,))]
    table["time"] = np.asarray(group["time"].get_orthogonal_selection((slots,)), dtype=np.float64)
    for k, term in enumerate(out["transform"].attrs["terms"]):
        table[term] = transform[:, k]
        table[term].unit = "pix"
    table.meta["TRANSFRM"] = out.attrs["time_model"]
    return table


def flux_sets_by_time(store, flux_group: str):
    """The ingested frames' times and both flux sets of a time-model flux group: ``(times, static, time)``,
    (T,) and (T, nsources) each, in slot order."""
    group = open_image_group(store)
    out = open_group(store, path=flux_group, mode="r")
    slots = ingested_frames(store)
    times = np.asarray(group["time"].get_orthogonal_selection((slots,)), dtype=float)
    static, moving = (
        out[FLUX_SETS[s][0]].get_orthogonal_selection((slots, slice(None))) for s in ("static", "time")
    )
    return times, static, moving


def write_flux_table(
    store,
    output,
    table: Table,
    transforms: Table | None = None,
    model_group=None,
    sources: Table | None = None,
) -> str:
    """Write the long-format flux FITS table atomically (fsync'd temporary name, then rename): HDU
    ``FLUXES`` (a :func:`flux_table`; the primary header's ``FLUXSET`` says which flux set), with a
    time model HDU ``FRAMES`` (a :func:`transform_table`), and HDU ``SOURCES`` (a :func:`source_table`)
    when given."""
    hdu = fits.table_to_hdu(table)
    hdu.name = "FLUXES"
    primary = fits.PrimaryHDU()
    primary.header["STORE"] = os.fspath(store)
    if model_group:
        primary.header["PRFMODEL"] = model_group
    primary.header["FLUXSET"] = (table.meta["FLUXSET"], "fluxes of the 'static' or the 'time' model")
    hdus = [primary, hdu]
    if transforms is not None:
        primary.header["TRANSFRM"] = (transforms.meta["TRANSFRM"], "time model: per-frame transform (FRAMES)")
        frame_hdu = fits.table_to_hdu(transforms)
        frame_hdu.name = "FRAMES"
        hdus.append(frame_hdu)
    if sources is not None:
        source_hdu = fits.table_to_hdu(sources)
        source_hdu.name = "SOURCES"
        hdus.append(source_hdu)
    return str(atomic_writeto(fits.HDUList(hdus), output))


def prf_model_key(store, params: PRFParameters, catalog_path) -> str:
    """Key of a shape model: the images ingested (content version), the parameters and the catalog file."""
    version = open_image_group(store).attrs.get("content_version", "")
    return keys.prf_model_key(version, params, catalog_path)


def add_psf_photometry(
    store, flux_group: str, zero_point: float = PSF_ZERO_POINT, name: str = "psf", fluxes: str | None = None
) -> dict:
    """Add the PRF fluxes to the field's photometry store as one more photometry (SPEC 6).

    mag = zero_point - 2.5 log10(flux), mag_err = 2.5 / ln(10) x flux_err / flux; fluxes that are not
    positive or are flagged give NaN (missing). Adding the same flux group twice changes nothing; a new
    PRF run replaces the photometry ``name`` in place. ``fluxes``: the flux set (:func:`flux_set`).
    """
    url = os.fspath(store)
    which = flux_set(store, flux_group, fluxes)
    origin_name = flux_group if which == "static" else f"{flux_group}#{which}"
    if store_exists(url) and open_store(url).attrs.get("photometry_origin", {}).get(name) == origin_name:
        return {"photometry": open_store(url).attrs["photometry_names"].index(name), "unchanged": True}
    group = open_image_group(store)
    out = open_group(url, path=flux_group, mode="r")
    slots = ingested_frames(store)
    flux, err, flag = (out[n].get_orthogonal_selection((slots, slice(None))) for n in FLUX_SETS[which])
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
    root = open_group(url, mode="r+")
    origin = dict(root.attrs.get("photometry_origin", {}))
    origin[name] = origin_name
    root.attrs["photometry_origin"] = origin
    return result
