"""The master photometric reference, step by step over a store (SPEC 3-5).

Three steps, each reading its inputs from the store and writing its result back into the store as a
group named after everything it depends on (:mod:`photref_core.keys`), so a cached step's result can never
be overwritten by a run with other parameters:

1. :func:`compute_statistics`: statistics with iterative rejection, out of core over source blocks
   -> ``results/statistics-<hash>``;
2. :func:`fit_statistics`: enough-count flags, fit-terms, scatter fit, scatter excess and master
   selection -> ``results/fit-<hash>``;
3. :func:`write_products`: the master FITS, the statistics table and the plots, beside each other.

:func:`build_master` runs the three in a row (what the Prefect flow does, minus Prefect).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

from ..catalog import read_catalog
from ..errors import retry_transient
from ..keys import file_key, fit_key, statistics_key
from ..store.frames import frame_states, frame_table
from ..store.groups import RESULTS_GROUP, load_group, write_group
from ..store.schema import INGESTED, committed_sizes, open_store
from .fits import write_master, write_statistics_table
from .fitterms import FitTerms, parse_fit_terms
from .outofcore import DEFAULT_BLOCK_BYTES, source_statistics_dask
from .parameters import MasterParameters, master_header
from .scatter import fit_scatter
from .stats import enough_flags, source_statistics

if TYPE_CHECKING:  # xarray (and pandas under it) costs ~0.35 s to import: only where it is used
    import xarray as xr

__all__ = [
    "beside_master",
    "build_master",
    "catalog_columns",
    "compute_statistics",
    "fit_statistics",
    "frames_used",
    "load_results",
    "merge_results",
    "photometry_summary",
    "products_intact",
    "scatter_fit_dataset",
    "statistics_path",
    "validate_fit_terms",
    "write_products",
]


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


def compute_statistics(
    store, params: MasterParameters, block_bytes: int = DEFAULT_BLOCK_BYTES, data_group: str | None = None
) -> str:
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
    data_group : str, optional
        Take ``mag``/``mag_err`` from this group of the store instead of the root: one iteration of
        magnitude fitting (:mod:`photref_core.magfit.loop`), whose ``fitted`` (frame,) array says which
        ingested frames it fitted and whose ``content_version`` attribute names its content.

    Returns
    -------
    str
        The store group holding the statistics (an ``xarray`` dataset, dims source x photometry).
    """
    url = os.fspath(store)
    group = open_store(url)
    data = group if data_group is None else group[data_group]
    version = data.attrs.get("content_version", "")
    name = f"{RESULTS_GROUP}/statistics-{statistics_key(version, params)}"
    n_frames, n_src = committed_sizes(group)  # a plan killed half-way left no phantom slots in use
    used = frames_used(group, data_group)
    ingested = np.flatnonzero(used)
    source_ids = group["source_id"][:n_src]
    in_catalog = group["in_catalog"][:n_src]
    n_phot = data["mag"].shape[2]
    if 8 * ingested.size * n_src * n_phot <= block_bytes:
        # The whole store fits in one block: read it straight into memory (no dask graph to build).
        # Whole chunks as a plain slice (zarr's orthogonal selection by index is ~50 % slower), then the
        # ingested frames (usually all of them) in memory.
        mag = data["mag"][:n_frames, :n_src]
        mag_err = data["mag_err"][:n_frames, :n_src]
        if ingested.size != n_frames:
            mag, mag_err = mag[ingested], mag_err[ingested]
        stats = source_statistics(mag, mag_err, params.rejection(), source_ids=source_ids)
    else:
        import xarray as xr

        ds = xr.open_zarr(url, group=data_group, consolidated=False)
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


def frames_used(group, data_group: str | None = None) -> np.ndarray:
    """Bool per committed frame slot: the frames a master is built from (ingested; with a magnitude-fitting
    ``data_group``, also fitted in that iteration)."""
    n_frames = committed_sizes(group)[0]
    used = frame_states(group, n_frames) == INGESTED
    if data_group is not None:
        used &= group[data_group]["fitted"][:n_frames]
    return used


def catalog_columns(catalog, source_ids: np.ndarray, in_catalog: np.ndarray) -> dict[str, np.ndarray]:
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
    key = fit_key(statistics_group, stats.attrs.get("content_version"), params, catalog_path)
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
    columns = catalog_columns(catalog, source_ids, in_catalog)
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
    import xarray as xr

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


def load_results(store, statistics_group: str, fit_group: str) -> xr.Dataset:
    """Statistics and fit merged in one dataset (dims source x photometry), in memory."""
    url = os.fspath(store)
    return merge_results(load_group(url, statistics_group), load_group(url, fit_group))


def merge_results(stats: xr.Dataset, fit: xr.Dataset) -> xr.Dataset:
    """Statistics and scatter fit in one dataset (what the master, the table and the plots are made of)."""
    merged = stats.assign({k: fit[k] for k in ("enough", "scatter_excess", "in_master", "in_fit", "usable")})
    merged = merged.assign({"coefficients": fit["coefficients"], "rms": fit["rms"], "n_fits": fit["n_fits"]})
    return merged.assign_coords(term_name=fit["term_name"])


def beside_master(master_path, suffix: str) -> Path:
    """A file beside a master, named after it: ``beside_master("m.fits", "_stat.fits")`` -> ``m_stat.fits``
    (the ``.fits`` of the master's name replaced by ``suffix``)."""
    master_path = Path(master_path)
    stem = master_path.name[: -len(".fits")] if master_path.name.endswith(".fits") else master_path.stem
    return master_path.with_name(stem + suffix)


def statistics_path(master_path) -> Path:
    """The statistics table file beside a master: ``NAME_stat.fits``."""
    return beside_master(master_path, "_stat.fits")


def write_products(
    store,
    statistics_group: str,
    fit_group: str,
    catalog_path,
    output,
    params: MasterParameters,
    extra_header: dict | None = None,
    plots: bool = True,
    data_group: str | None = None,
) -> dict:
    """Write the master FITS, the statistics table (``*_stat.fits``) and the plots beside each other.

    ``data_group``: the magnitude-fitting iteration the statistics were computed from (see
    :func:`compute_statistics`); a frame its fit quarantined is listed in ``INMASTER`` as not included.

    Returns
    -------
    dict
        Paths (``master``, ``statistics``, ``plots``) and a per-photometry summary (stars in the master,
        used in the fit, rejected by the fit, coefficients, rms).
    """
    results = load_results(store, statistics_group, fit_group)
    catalog = read_catalog(catalog_path)
    frames = frame_table(store)
    included = np.asarray(frames["state"] == "ingested")
    used = frames_used(open_store(store), data_group)
    included[: used.size] &= used
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
    files = [str(master), str(stat), *plot_paths]
    return {
        "master": str(master),
        "statistics": str(stat),
        "plots": plot_paths,
        # What was written, as it was written: a cached result is handed back only while the files on
        # disk are still these (products_intact), never after another run overwrote them.
        "files": {path: file_key(path) for path in files},
        "frames_included": int(included.sum()),
        "frames_excluded": int((~included).sum()),
        "photometries": summary,
    }


def products_intact(products: dict) -> bool:
    """Whether the files a :func:`write_products` result names are still on disk exactly as it wrote them
    (same path, mtime and size). False when any was deleted, or overwritten (e.g. by a run with other
    parameters writing to the same output): then the cached result must not be used."""
    files = products.get("files")
    if not files:
        return False
    return all(file_key(path) == list(identity) for path, identity in files.items())


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
