"""The master photometric reference, step by step over a store (SPEC 3-5).

Three steps, each reading its inputs from the store and writing its result back into the store as a
group named after everything it depends on, so a cached step's result can never be overwritten by a
run with other parameters:

1. :func:`compute_statistics`: statistics with iterative rejection, out of core over source blocks
   -> ``results/statistics-<hash>``;
2. :func:`fit_statistics`: enough-count flags, fit-terms, scatter fit, scatter excess and master
   selection -> ``results/fit-<hash>``;
3. :func:`write_products`: the master FITS, the statistics table and the plots, beside each other.

:func:`build_master` runs the three in a row (what the Prefect flow does, minus Prefect).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
import zarr.api.asynchronous
from astropy.table import Table
from zarr.core.sync import sync

from . import SOFTWARE
from .fitterms import DEFAULT_FIT_TERMS, FitTerms, parse_fit_terms
from .io import read_catalog, retry_transient
from .master import write_master, write_statistics_table
from .scatter import ScatterFitParameters, fit_scatter
from .stats import RejectionParameters, enough_flags, source_statistics, source_statistics_dask
from .store import INGESTED, committed_sizes, frame_states, frame_table, open_store

RESULTS_GROUP = "results"


@dataclass(frozen=True)
class MasterParameters:
    """Every parameter of SPEC 3-5, with the SPEC defaults (names as AutoWISP's)."""

    outlier_threshold: float = 5.0
    max_rejection_iterations: int = 10
    rejection_center: str = "median"
    rejection_units: str = "meddev"
    min_nobs_median_fraction: float = 0.5
    fit_terms: str = DEFAULT_FIT_TERMS
    fit_outlier_threshold: float = 3.0
    fit_outlier_average: str = "median"
    fit_max_rej_iter: int = 20
    scatter_quantity: str = "medianmeddev"

    def __post_init__(self):
        # Fail on bad values at construction, before any work starts.
        self.rejection()
        self.scatter()
        parse_fit_terms(self.fit_terms)
        fraction = self.min_nobs_median_fraction
        if not (isinstance(fraction, int | float) and 0 <= fraction and np.isfinite(fraction)):
            raise ValueError(f"min_nobs_median_fraction must be a finite number >= 0, got {fraction!r}")

    def rejection(self) -> RejectionParameters:
        """The statistics' parameters."""
        return RejectionParameters(
            outlier_threshold=self.outlier_threshold,
            max_rejection_iterations=self.max_rejection_iterations,
            rejection_center=self.rejection_center,
            rejection_units=self.rejection_units,
        )

    def scatter(self) -> ScatterFitParameters:
        """The scatter fit's parameters."""
        return ScatterFitParameters(
            fit_outlier_threshold=self.fit_outlier_threshold,
            fit_outlier_average=self.fit_outlier_average,
            fit_max_rej_iter=self.fit_max_rej_iter,
            scatter_quantity=self.scatter_quantity,
        )

    def as_dict(self) -> dict:
        """Plain dictionary of the parameters."""
        return dataclasses.asdict(self)

    STATISTICS_FIELDS = (
        "outlier_threshold",
        "max_rejection_iterations",
        "rejection_center",
        "rejection_units",
    )


def digest(*parts) -> str:
    """Short stable hash of JSON-able parts (used for result names and cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def statistics_key(content_version: str, params: MasterParameters) -> str:
    """Name of the statistics group for a store content and the statistics' parameters."""
    return digest(content_version, {k: getattr(params, k) for k in params.STATISTICS_FIELDS})


def validate_fit_terms(fit_terms: str, catalog) -> FitTerms:
    """Parse the expression and check that every variable is a catalog column or ``magnitude``.

    Called before any work starts, so a bad expression from the UI costs nothing.

    Parameters
    ----------
    fit_terms : str
        The expression (SPEC 4).
    catalog : str, os.PathLike or astropy.table.Table
        The catalog file (read here, transient I/O errors retried) or a table from
        :func:`photref_core.io.read_catalog`.

    Raises
    ------
    FitTermsError
        Naming the offending text or the unknown column(s).
    BadInputError
        When the catalog cannot be read or is empty.
    """
    terms = parse_fit_terms(fit_terms)
    if not isinstance(catalog, Table):
        catalog = retry_transient(read_catalog, catalog)
    terms.check_columns(list(catalog.colnames) + ["magnitude"])
    return terms


def compute_statistics(store, params: MasterParameters, block_bytes: int = 64 * 2**20) -> str:
    """Statistics with iterative rejection over the ingested frames (SPEC 3), stored in the store.

    Parameters
    ----------
    store : str or os.PathLike
        The photref store.
    params : MasterParameters
        Only the rejection parameters are used.
    block_bytes : int
        Memory budget of one source block (out of core: peak memory ~ 6 x this x dask threads). A store
        whose ingested data fit in one block is computed in memory, without dask.

    Returns
    -------
    str
        The store group holding the statistics (an ``xarray`` dataset, dims source x photometry).
    """
    url = os.fspath(store)
    group = open_store(url)
    version = group.attrs.get("content_version", "")
    name = f"{RESULTS_GROUP}/statistics-{statistics_key(version, params)}"
    n_frames, n_src = committed_sizes(group)  # a plan killed half-way left no phantom slots in use
    ingested = np.flatnonzero(frame_states(group, n_frames) == INGESTED)
    source_ids = group["source_id"][:n_src]
    in_catalog = group["in_catalog"][:n_src]
    n_phot = group["mag"].shape[2]
    if 8 * ingested.size * n_src * n_phot <= block_bytes:
        # The whole store fits in one block: read it straight into memory (no dask graph to build).
        # Whole chunks as a plain slice (zarr's orthogonal selection by index is ~50 % slower), then the
        # ingested frames (usually all of them) in memory.
        mag = group["mag"][:n_frames, :n_src]
        mag_err = group["mag_err"][:n_frames, :n_src]
        if ingested.size != n_frames:
            mag, mag_err = mag[ingested], mag_err[ingested]
        stats = source_statistics(mag, mag_err, params.rejection(), source_ids=source_ids)
    else:
        ds = xr.open_zarr(url, consolidated=False)
        stats = source_statistics_dask(
            ds["mag"].data[ingested, :n_src],
            ds["mag_err"].data[ingested, :n_src],
            params.rejection(),
            source_ids=source_ids,
            block_bytes=block_bytes,
        )
    stats["in_catalog"] = ("source", in_catalog)
    stats.attrs.update(
        {"content_version": version, "n_frames": int(ingested.size), "kind": "photref statistics"}
    )
    write_group(url, name, stats)
    return name


def write_group(store, name: str, ds: xr.Dataset) -> None:
    """Write a small in-memory result dataset as a store group, the way ``Dataset.to_zarr`` lays it out.

    ``to_zarr`` creates each array, writes its chunk and then rewrites its metadata with the attributes,
    one array after the other (~45 ms for the dozen small arrays of a statistics group here). This writes
    the same layout -- one chunk per array, ``dimension_names``, the ``coordinates`` attribute of data
    variables, ``_FillValue`` (base64, as xarray encodes it for zarr v3) for floats -- with each array
    created with its attributes and all arrays written at once. Datasets holding dask arrays (the
    out-of-core statistics) or Python objects go through ``to_zarr`` itself.
    """
    url = os.fspath(store)

    def plain(var: xr.Variable) -> bool:
        if var.chunks is not None:
            return False
        if var.dtype.kind == "O":  # strings as Python objects: to_zarr writes them as zarr strings
            return all(isinstance(x, str) for x in var.values.ravel())
        return var.dtype.kind in "biufT"

    if not all(plain(v) for v in ds.variables.values()):  # dask arrays, fixed-width or other objects
        ds.to_zarr(url, group=name, mode="w", consolidated=False)
        return
    coordinates = [c for c in ds.coords if c not in ds.dims]

    def attributes(var_name: str, var: xr.Variable) -> dict:
        attrs = dict(var.attrs)
        if var_name not in ds.coords:
            linked = [c for c in coordinates if set(ds[c].dims) <= set(var.dims)]
            if linked:
                attrs["coordinates"] = " ".join(linked)
        if var.dtype.kind == "f":  # xarray encodes a float fill value as a little-endian double
            attrs["_FillValue"] = base64.b64encode(np.array(np.nan, dtype="<f8").tobytes()).decode()
        return attrs

    async def write_array(group, var_name: str, var: xr.Variable) -> None:
        values = var.values
        if values.dtype.kind == "O":
            values = values.astype(np.dtypes.StringDType())
        fill = {"f": np.nan, "T": ""}.get(values.dtype.kind, 0)
        array = await group.create_array(
            var_name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=tuple(max(1, n) for n in values.shape),
            fill_value=False if values.dtype.kind == "b" else fill,
            dimension_names=list(var.dims),
            attributes=attributes(var_name, var),
        )
        if values.size:
            await array.setitem(Ellipsis, values)

    async def write_all() -> None:
        group = await zarr.api.asynchronous.open_group(
            store=url, path=name, mode="w", attributes=dict(ds.attrs)
        )
        # Every write finishes before an error is raised: a retry must not meet stray writes of this one.
        results = await asyncio.gather(
            *(write_array(group, n, v) for n, v in ds.variables.items()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    sync(write_all())


def load_group(store, name: str) -> xr.Dataset:
    """A result group of the store (statistics, fit), read into memory (without dask: the groups are
    small, one chunk per variable)."""
    return xr.open_zarr(os.fspath(store), group=name, consolidated=False, chunks=None).load()


def _catalog_columns(catalog, source_ids: np.ndarray, in_catalog: np.ndarray) -> dict[str, np.ndarray]:
    """Catalog columns aligned with ``source_ids`` (NaN for stars not in the catalog)."""
    cat_ids = np.asarray(catalog["source_id"], dtype=np.uint64)
    pos = np.clip(np.searchsorted(cat_ids, source_ids), 0, max(cat_ids.size - 1, 0))
    found = cat_ids[pos] == source_ids
    columns = {}
    for name in catalog.colnames:
        if name == "source_id":
            continue
        values = np.asarray(catalog[name], dtype=np.float64)[pos]
        values[~(found & in_catalog)] = np.nan
        columns[name] = values
    return columns


def fit_statistics(store, statistics_group: str, catalog_path, params: MasterParameters) -> str:
    """Enough flags, scatter fit and master selection for every photometry (SPEC 3 end, SPEC 5), from a
    statistics group of the store, into a new group of the store (see :func:`scatter_fit_dataset`).

    Returns
    -------
    str
        The store group of the result.

    Raises
    ------
    FitError
        When a photometry has fewer usable stars than terms (names the photometry and the counts).
    """
    url = os.fspath(store)
    stats = load_group(url, statistics_group)
    catalog = read_catalog(catalog_path)
    key = digest(
        statistics_group,
        stats.attrs.get("content_version"),
        params.as_dict(),
        catalog.meta.get("path"),
        _file_identity(catalog_path),
    )
    name = f"{RESULTS_GROUP}/fit-{key}"
    fit = scatter_fit_dataset(stats, catalog, params)
    fit.attrs["statistics_group"] = statistics_group
    write_group(url, name, fit)
    return name


def scatter_fit_dataset(stats: xr.Dataset, catalog, params: MasterParameters) -> xr.Dataset:
    """Enough flags, scatter fit and master selection for every photometry (SPEC 3 end, SPEC 5), in memory.

    Stars missing from the catalog have NaN predictors: they never enter the fit or the master.

    Parameters
    ----------
    stats : xarray.Dataset
        From :func:`photref_core.stats.source_statistics` plus ``in_catalog`` (source).
    catalog : astropy.table.Table
        From :func:`photref_core.io.read_catalog`: the variables of the fit terms.
    params : MasterParameters
        The enough-count and scatter-fit parameters are used.

    Returns
    -------
    xarray.Dataset
        ``enough``, ``usable``, ``in_fit``, ``scatter_excess``, ``in_master`` (source x photometry),
        ``coefficients`` (photometry x term), ``rms`` and ``n_fits`` (photometry).

    Raises
    ------
    FitError
        When a photometry has fewer usable stars than terms (names the photometry and the counts).
    """
    terms = parse_fit_terms(params.fit_terms)
    terms.check_columns(list(catalog.colnames) + ["magnitude"])
    source_ids = stats["source_id"].values
    in_catalog = stats["in_catalog"].values
    columns = _catalog_columns(catalog, source_ids, in_catalog)
    enough = enough_flags(
        stats["rejected_count"].values, params.min_nobs_median_fraction, full_count=stats["full_count"].values
    )
    scatter_all = stats[params.scatter_quantity].values
    nsrc, nphot = scatter_all.shape
    out = {k: np.zeros((nsrc, nphot), bool) for k in ("usable", "in_fit", "in_master")}
    excess = np.full((nsrc, nphot), np.nan)
    coefficients = np.full((nphot, terms.n_terms), np.nan)
    rms = np.full(nphot, np.nan)
    n_fits = np.zeros(nphot, np.int64)
    for p in range(nphot):
        X = terms.evaluate({**columns, "magnitude": stats["magnitude"].values[:, p]})
        X[~in_catalog] = np.nan  # not in the catalog: no predictors (SPEC 1.2)
        result = fit_scatter(scatter_all[:, p], X, enough[:, p], params.scatter(), photometry=p)
        excess[:, p] = result.scatter_excess
        out["usable"][:, p] = result.usable
        out["in_fit"][:, p] = result.in_fit
        out["in_master"][:, p] = result.in_master & in_catalog
        coefficients[p] = result.coefficients
        rms[p] = result.rms
        n_fits[p] = result.n_fits
    return xr.Dataset(
        {
            "enough": (("source", "photometry"), enough),
            "scatter_excess": (("source", "photometry"), excess),
            **{k: (("source", "photometry"), v) for k, v in out.items()},
            "coefficients": (("photometry", "term"), coefficients),
            "rms": ("photometry", rms),
            "n_fits": ("photometry", n_fits),
        },
        coords={
            "source_id": ("source", source_ids),
            # object strings are stored as zarr variable-length strings (fixed-width ones are not in the spec)
            "term_name": ("term", np.array(terms.term_names, dtype=object)),
        },
        attrs={"parameters": json.dumps(params.as_dict()), "kind": "photref scatter fit"},
    )


def _file_identity(path) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [os.fspath(path), None, None]
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


def load_results(store, statistics_group: str, fit_group: str) -> xr.Dataset:
    """Statistics and fit merged in one dataset (dims source x photometry), in memory."""
    url = os.fspath(store)
    return merge_results(load_group(url, statistics_group), load_group(url, fit_group))


def merge_results(stats: xr.Dataset, fit: xr.Dataset) -> xr.Dataset:
    """Statistics and scatter fit in one dataset (what the master, the table and the plots are made of)."""
    merged = stats.assign({k: fit[k] for k in ("enough", "scatter_excess", "in_master", "in_fit", "usable")})
    merged = merged.assign({"coefficients": fit["coefficients"], "rms": fit["rms"], "n_fits": fit["n_fits"]})
    return merged.assign_coords(term_name=fit["term_name"])


def statistics_path(master_path) -> Path:
    """The statistics table file beside a master: ``NAME_stat.fits``."""
    master_path = Path(master_path)
    stem = master_path.name[: -len(".fits")] if master_path.name.endswith(".fits") else master_path.stem
    return master_path.with_name(f"{stem}_stat.fits")


def master_header(store, params: MasterParameters, n_frames: int) -> dict:
    """The master's primary header keywords (SPEC 5)."""
    return {
        "FITTERMS": params.fit_terms,
        "MINOBSFR": params.min_nobs_median_fraction,
        "OUTL_AVG": params.fit_outlier_average,
        "OUTL_THR": params.fit_outlier_threshold,
        "MAXREJIT": params.fit_max_rej_iter,
        "STATTHR": params.outlier_threshold,
        "STATITER": params.max_rejection_iterations,
        "STATCEN": params.rejection_center,
        "STATUNIT": params.rejection_units,
        "SCATQTY": params.scatter_quantity,
        "NFRAMES": n_frames,
        "SOFTWARE": SOFTWARE,
        "STORE": os.fspath(store) if "://" in os.fspath(store) else os.path.abspath(store),
    }


def write_products(
    store,
    statistics_group: str,
    fit_group: str,
    catalog_path,
    output,
    params: MasterParameters,
    extra_header: dict | None = None,
    plots: bool = True,
) -> dict:
    """Write the master FITS, the statistics table (``*_stat.fits``) and the plots beside each other.

    Returns
    -------
    dict
        Paths (``master``, ``statistics``, ``plots``) and a per-photometry summary (stars in the master,
        used in the fit, rejected by the fit, coefficients, rms).
    """
    results = load_results(store, statistics_group, fit_group)
    catalog = read_catalog(catalog_path)
    frames = frame_table(store)
    included = frames["state"] == "ingested"
    frames_out = frames[["frame_id", "path"]]
    frames_out["included"] = np.asarray(included)
    header = master_header(store, params, int(included.sum()))
    master = write_master(output, results, frames_out, header, extra_header=extra_header)
    stat = write_statistics_table(statistics_path(master), results, catalog)
    summary = photometry_summary(results)
    plot_paths = []
    if plots:
        from .plots import plot_excess_histogram, plot_scatter_fits

        plot_paths.append(
            str(plot_scatter_fits(results, params, master.with_name(master.stem + "_scatter.png")))
        )
        plot_paths.append(
            str(plot_excess_histogram(results, params, master.with_name(master.stem + "_excess.png")))
        )
    return {
        "master": str(master),
        "statistics": str(stat),
        "plots": plot_paths,
        "frames_included": int(included.sum()),
        "frames_excluded": int((~included).sum()),
        "photometries": summary,
    }


def photometry_summary(results: xr.Dataset) -> list[dict]:
    """One row per photometry: stars measured, usable, in the final fit, in the master; rms; coefficients."""
    rows = []
    for p in range(results.sizes["photometry"]):
        r = results.isel(photometry=p)
        rows.append(
            {
                "photometry": p,
                "stars_measured": int((r["full_count"] > 0).sum()),
                "stars_enough": int(r["enough"].sum()),
                "stars_usable": int(r["usable"].sum()),
                "stars_in_fit": int(r["in_fit"].sum()),
                "stars_rejected_by_fit": int((r["usable"] & ~r["in_fit"]).sum()),
                "stars_in_master": int(r["in_master"].sum()),
                "fit_rms_dex": float(r["rms"]),
                "n_fits": int(r["n_fits"]),
                "coefficients": [float(c) for c in r["coefficients"].values],
            }
        )
    return rows


def build_master(store, catalog_path, output, params: MasterParameters | None = None, **kwargs) -> dict:
    """All three steps in a row, without Prefect (for scripts, notebooks and the benchmark)."""
    params = params or MasterParameters()
    validate_fit_terms(params.fit_terms, catalog_path)
    stats_group = compute_statistics(store, params, **kwargs)
    fit_group = fit_statistics(store, stats_group, catalog_path, params)
    return write_products(store, stats_group, fit_group, catalog_path, output, params)


def prune_results(store, keep: set[str]) -> list[str]:
    """Delete result groups not named in ``keep`` (old parameter sets); returns the deleted names."""
    group = zarr.open_group(os.fspath(store), mode="r+")
    if RESULTS_GROUP not in group:
        return []
    results = group[RESULTS_GROUP]
    deleted = []
    for name in list(results.group_keys()):
        full = f"{RESULTS_GROUP}/{name}"
        if full not in keep:
            del results[name]
            deleted.append(full)
    return deleted
