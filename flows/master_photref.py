"""Flow: the master photometric reference (SPEC 3-5), optionally after ingesting new frames.

DAG::

    ingestion-needed -> [ingest-frames subflow] -> statistics -> scatter-fit -> master-products
                                                                   -> summary artifacts (when written now)

(each cached step followed by its ``result-exists`` / ``products-intact`` check)

Before any task, the flow reads the catalog and checks the fit-terms expression against it (a bad one
fails the run at once, with the offending text); that check is flow code, not a task, as it does no work
worth a task run of its own (transient read errors are retried in place).

The ingestion subflow runs when frames are given and one of them is new or changed (or the catalog adds
stars); otherwise it is left out (the read-only ``ingestion-needed`` task, logged).

Every read of the store that decides what runs is a task (retried on transient I/O, shown in the UI):
``ingestion-needed``, and after each cached step the check that its result is still there.

Every step is cached: an unchanged re-run returns at once; new frames change the store's content
version, so the statistics and everything after them run again; a changed fit threshold re-runs only the
scatter fit and the products. The summary and table artifacts (keys per field) are published by the run
that writes the products; a run served from the cache logs that the master is unchanged and publishes
nothing new (the artifacts of the run that wrote it stay the latest versions of their keys), unless its
ingestion quarantined a file: then its summary says so.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from photref_core.catalog import read_catalog
from photref_core.errors import retry_transient
from photref_core.master.outofcore import DEFAULT_BLOCK_MIB
from photref_core.master.parameters import MasterParameters
from photref_core.master.steps import statistics_path, validate_fit_terms
from photref_core.store.lock import store_run
from photref_core.store.schema import store_url
from tasks.master import compute_statistics, fit_statistics, group_exists, products_intact, write_products
from tasks.naming import field_name, flow_run_name, master_changes

from .artifacts import publish_master_artifacts
from .ingest import ingest_new_frames
from .runners import make_task_runner, run_by_hand


def master_steps(
    store: str,
    catalog: str,
    output: str,
    params: MasterParameters,
    block_mib: float,
    extra_header: dict | None,
    plots: bool,
    data_group: str | None = None,
    label: str | None = None,
) -> tuple[str, str, dict, bool]:
    """The master chain as cached tasks: ``statistics`` -> ``scatter-fit`` -> ``master-products``, each
    followed by the check that its result is still there. Each step is submitted to the task runner (so
    it runs on the Dask cluster when there is one) and awaited: the next step needs its result.

    ``data_group``: a magnitude-fitting iteration's group to build the master from (default: the store's
    own magnitudes); ``label`` names the statistics and fit task runs (e.g. ``iter2``).
    Returns the statistics and fit groups, the products, and whether the products came from the cache.
    """
    block_bytes = max(1, int(block_mib * 2**20))

    def has_group(name: str) -> bool:
        return group_exists(store, name)

    statistics, fit = compute_statistics, fit_statistics
    if label is not None:
        field = field_name(store)
        statistics = statistics.with_options(task_run_name=f"statistics {field} {label}")
        fit = fit.with_options(task_run_name=f"scatter fit {field} {label}")
    stats_group, _ = run_cached_step(statistics, (store, params, block_bytes, data_group), has_group)
    fit_group, _ = run_cached_step(fit, (store, stats_group, catalog, params), has_group)
    products, unchanged = run_cached_step(
        write_products,
        (store, stats_group, fit_group, catalog, output, params, extra_header, plots, data_group),
        products_intact,
    )
    return stats_group, fit_group, products, unchanged


def run_cached_step(task, args: tuple, still_valid) -> tuple[object, bool]:
    """Run a cached step; when its cached result has gone since (a pruned store group, a deleted file),
    run it again with a fresh cache entry. Returns the result and whether it was served from the cache."""
    future = task.submit(*args)
    result = future.result()
    if not still_valid(result):
        future = task.with_options(refresh_cache=True).submit(*args)
        result = future.result()
    return result, future.state.name == "Cached"


@flow(
    name="master-photref",
    flow_run_name=flow_run_name("master", lambda p: master_changes(p.get("params"))),
    task_runner=make_task_runner(),
)
def build_master_photref(
    store: str,
    catalog: str,
    output: str,
    frames: list[str] | None = None,
    params: MasterParameters = MasterParameters(),  # noqa: B008 - frozen: one shared default is safe
    strict: bool = False,
    extra_header: dict | None = None,
    block_mib: float = DEFAULT_BLOCK_MIB,
    plots: bool = True,
    lock_timeout: float | None = 0.0,
) -> dict:
    """Build the master photometric reference of a store.

    Parameters
    ----------
    store : str
        The field's store (directory or fsspec URL).
    catalog : str
        Catalog file (SPEC 1.2): the variables of the fit terms.
    output : str
        Master FITS path; the statistics table goes beside it as ``<name>_stat.fits``, plots as PNG.
    frames : list of str, optional
        Frame files or globs to ingest first (only new or changed ones are read).
    params : MasterParameters
        The SPEC 3-5 parameters: statistics with rejection, scatter fit, master cut.
    strict : bool
        Fail on a bad frame instead of quarantining it.
    extra_header : dict, optional
        Keywords for the master's primary header.
    block_mib : float
        Memory budget of one out-of-core source block, in MiB.
    plots : bool
        Write the PNG plots.
    lock_timeout : float or None
        Seconds to wait for another run on the same store to finish (0: refuse at once; None: wait).

    Returns
    -------
    dict
        Paths of the products and a per-photometry summary; ``ingestion``: the ingestion subflow's
        summary (None when it did not run); ``cached``: whether the products came from the cache;
        ``written_by``: the id and name of the flow run that wrote them.
    """
    logger = get_run_logger()
    # One spelling of every path (a relative store path would miss the cache of an absolute one).
    store, catalog, output = store_url(store), os.path.abspath(catalog), os.path.abspath(output)
    catalog_table = retry_transient(read_catalog, catalog)
    term_names = validate_fit_terms(params.fit_terms, catalog_table).term_names
    with store_run(store, timeout=lock_timeout):
        ingestion = ingest_new_frames(store, frames, catalog, catalog_table, strict, lock_timeout)

        _, _, products, unchanged = master_steps(
            store, catalog, output, params, block_mib, extra_header, plots
        )
        products = products | {"ingestion": ingestion, "cached": unchanged}
        if unchanged:
            logger.info("master %s unchanged (served from the cache)", products["master"])
        else:
            logger.info(
                "master written to %s (%s)", products["master"], statistics_path(products["master"]).name
            )
        if unchanged and not (ingestion or {}).get("quarantined"):
            # Same products as the run that wrote them (their cache key covers every input), and that run
            # published their summary and table: the latest versions of these artifact keys. Publishing
            # them again would add identical versions and cost a cached re-run a quarter of its time. (A
            # run that quarantined a new frame publishes: its summary must say so.)
            return products
        publish_master_artifacts(store, products, params, term_names, bool(frames), block_mib)
        return products


def run_master(store, catalog, output, max_workers=None, dask_address=None, **kwargs) -> dict:
    """Run :func:`build_master_photref` by hand (see :func:`flows.runners.run_by_hand`): a chosen task
    runner (bounded threads or a Dask scheduler), no flow-run heartbeat unless one is configured."""
    return run_by_hand(
        build_master_photref,
        max_workers,
        dask_address,
        store=os.fspath(store),
        catalog=os.fspath(catalog),
        output=os.fspath(output),
        **kwargs,
    )
