"""Flow: the master photometric reference (SPEC 3-5), optionally after ingesting new frames.

DAG::

    [ingest-frames subflow] -> statistics -> scatter-fit -> master-products -> summary artifacts
                                                                                (when written now)

Before any task, the flow reads the catalog and checks the fit-terms expression against it (a bad one
fails the run at once, with the offending text); that check is flow code, not a task, as it does no work
worth a task run of its own (transient read errors are retried in place).

The ingestion subflow runs when frames are given and one of them is new or changed (or the catalog adds
stars); otherwise it is left out (a read-only check of the store, logged).

Every step is cached: an unchanged re-run returns at once; new frames change the store's content
version, so the statistics and everything after them run again; a changed fit threshold re-runs only the
scatter fit and the products. The summary and table artifacts are published by the run that writes the
products; a run served from the cache logs that the master is unchanged and publishes nothing new (the
artifacts of the run that wrote it stay the latest versions of their keys, unless another master was
built since under the same keys).
"""

from __future__ import annotations

import base64
import os
from functools import partial
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from photref_core.errors import BadInputError, StoreError
from photref_core.fitterms import DEFAULT_FIT_TERMS
from photref_core.io import read_catalog, retry_transient
from photref_core.reference import MasterParameters, statistics_path, validate_fit_terms
from photref_core.store import ingestion_needed, store_lock
from tasks.master import compute_statistics, fit_scatter, store_has_group, write_products

from .ingest import expand_frame_paths, ingest_frames
from .runners import make_task_runner, run_by_hand


def _image_markdown(path: str, max_bytes: int = 400_000) -> str:
    """A PNG for a markdown artifact: inline (data URI) when small, else a link to the file."""
    data = Path(path).read_bytes()
    if len(data) <= max_bytes:
        return f"![{Path(path).name}](data:image/png;base64,{base64.b64encode(data).decode()})"
    return f"[{Path(path).name}]({Path(path).as_uri()})"


def _summary_markdown(products: dict, params: MasterParameters, term_names: list[str]) -> str:
    lines = [
        f"# Master photometric reference `{Path(products['master']).name}`",
        "",
        f"* master: `{products['master']}`",
        f"* statistics table: `{products['statistics']}`",
        f"* frames included: {products['frames_included']}, excluded: {products['frames_excluded']}",
        f"* fit terms: `{params.fit_terms}` -> {', '.join(term_names)}",
        "",
        "| photometry | measured | enough | in fit | rejected by fit | in master | rms (dex) | fits |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in products["photometries"]:
        lines.append(
            f"| {row['photometry']} | {row['stars_measured']} | {row['stars_enough']} "
            f"| {row['stars_in_fit']} | {row['stars_rejected_by_fit']} | {row['stars_in_master']} "
            f"| {row['fit_rms_dex']:.4f} | {row['n_fits']} |"
        )
    for plot in products["plots"]:
        lines += ["", f"`{plot}`", "", _image_markdown(plot)]
    return "\n".join(lines)


def _ingestion_needed(store: str, frames: list[str], catalog) -> bool:
    """Whether the ingestion subflow has anything to do (a read-only check, much cheaper than a subflow
    run); when the check cannot tell (an I/O error), the subflow runs and reports."""
    try:
        return ingestion_needed(store, expand_frame_paths(frames), catalog)
    except (OSError, StoreError, BadInputError):
        return True


def _run_step(task, args: tuple, still_valid) -> tuple[object, bool]:
    """Run a cached step; when its cached result has gone since (a pruned store group, a deleted file),
    run it again with a fresh cache entry. Returns the result and whether it was served from the cache."""
    future = task.submit(*args)
    result = future.result()
    if not still_valid(result):
        future = task.with_options(refresh_cache=True).submit(*args)
        result = future.result()
    return result, future.state.name == "Cached"


@flow(name="master-photref", flow_run_name="master {output}", task_runner=make_task_runner())
def build_master_photref(
    store: str,
    catalog: str,
    output: str,
    frames: list[str] | None = None,
    strict: bool = False,
    outlier_threshold: float = 5.0,
    max_rejection_iterations: int = 10,
    rejection_center: Literal["median", "mean"] = "median",
    rejection_units: Literal["stddev", "meddev", "absolute"] = "meddev",
    min_nobs_median_fraction: float = 0.5,
    fit_terms: str = DEFAULT_FIT_TERMS,
    fit_outlier_threshold: float = 3.0,
    fit_outlier_average: Literal["median", "mean"] = "median",
    fit_max_rej_iter: int = 20,
    scatter_quantity: Literal["medianmeddev", "mediandev"] = "medianmeddev",
    extra_header: dict | None = None,
    block_mib: float = 64,
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
    strict : bool
        Fail on a bad frame instead of quarantining it.
    outlier_threshold, max_rejection_iterations, rejection_center, rejection_units
        Statistics with iterative rejection (SPEC 3).
    min_nobs_median_fraction : float
        Enough-count threshold, as a fraction of the median kept count.
    fit_terms, fit_outlier_threshold, fit_outlier_average, fit_max_rej_iter, scatter_quantity
        Scatter fit (SPEC 4, 5).
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
        Paths of the products and a per-photometry summary.
    """
    logger = get_run_logger()
    store, catalog, output = os.fspath(store), os.fspath(catalog), os.path.abspath(output)
    params = MasterParameters(
        outlier_threshold=outlier_threshold,
        max_rejection_iterations=max_rejection_iterations,
        rejection_center=rejection_center,
        rejection_units=rejection_units,
        min_nobs_median_fraction=min_nobs_median_fraction,
        fit_terms=fit_terms,
        fit_outlier_threshold=fit_outlier_threshold,
        fit_outlier_average=fit_outlier_average,
        fit_max_rej_iter=fit_max_rej_iter,
        scatter_quantity=scatter_quantity,
    )
    catalog_table = retry_transient(read_catalog, catalog)
    term_names = validate_fit_terms(fit_terms, catalog_table).term_names
    with store_lock(store, timeout=lock_timeout):
        if frames and _ingestion_needed(store, frames, catalog_table):
            # The ingestion subflow runs on this run's task runner (threads or the Dask cluster).
            runner = FlowRunContext.get().task_runner.duplicate()
            ingest_frames.with_options(task_runner=runner)(
                store=store, frames=frames, catalog=catalog, strict=strict, lock_timeout=lock_timeout
            )
        elif frames:
            logger.info("no new or changed frame among %s: ingestion left out", frames)

        # Each step is submitted to the task runner (so it runs on the Dask cluster when there is one)
        # and awaited: the next step needs its result.
        block_bytes = max(1, int(block_mib * 2**20))
        has_group = partial(store_has_group, store)
        stats_group, _ = _run_step(compute_statistics, (store, params, block_bytes), has_group)
        fit_group, _ = _run_step(fit_scatter, (store, stats_group, catalog, params), has_group)
        products, unchanged = _run_step(
            write_products,
            (store, stats_group, fit_group, catalog, output, params, extra_header, plots),
            lambda p: all(os.path.exists(f) for f in [p["master"], p["statistics"], *p["plots"]]),
        )
        if unchanged:
            # Same products as the run that wrote them (their cache key covers every input), and that run
            # published their summary and table: the latest versions of these artifact keys. Publishing
            # them again would add identical versions and cost a cached re-run a quarter of its time.
            logger.info(
                "master %s unchanged (served from the cache): no new artifact versions", products["master"]
            )
            return products
        logger.info("master written to %s (%s)", products["master"], statistics_path(products["master"]).name)

        create_markdown_artifact(
            _summary_markdown(products, params, term_names),
            key="master-photref-summary",
            description=f"Master photometric reference {output}",
        )
        create_table_artifact(
            [
                {k: v for k, v in row.items() if k != "coefficients"}
                | {"coefficients": ", ".join(f"{c:.5g}" for c in row["coefficients"])}
                for row in products["photometries"]
            ],
            key="master-photref-photometries",
            description="Per-photometry fit summary",
        )
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
