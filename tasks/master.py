"""Prefect tasks of the master photometric reference: statistics, scatter fit, products.

Each task is named after the core function it wraps (:mod:`photref_core.master.steps`). Cache keys come
from :mod:`photref_core.keys`: the store's content version, the parameters that matter for each step, the
input file identities and the code version of photref_core; never from a hash of a large array. Each
step's result lives in the store (a group named after its key) or on disk; the tasks return names and
paths.
"""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from photref_core import keys
from photref_core.master import steps
from photref_core.master.parameters import MasterParameters
from photref_core.store import groups
from photref_core.store.schema import open_store

from .common import IO_RETRY
from .naming import field_name, join_name, master_changes, write_task_name

__all__ = ["compute_statistics", "fit_statistics", "group_exists", "products_intact", "write_products"]


def _statistics_key(context, parameters) -> str:
    store = os.fspath(parameters["store"])
    data_group = parameters.get("data_group")
    group = open_store(store)
    version = (group if data_group is None else group[data_group]).attrs.get("content_version", "")
    params: MasterParameters = parameters["params"]
    return keys.digest(
        "statistics", keys.code_version(), store, data_group, keys.statistics_key(version, params)
    )


def _fit_key(context, parameters) -> str:
    params: MasterParameters = parameters["params"]
    return keys.digest(
        "fit",
        keys.code_version(),
        os.fspath(parameters["store"]),
        parameters["statistics_group"],
        params.as_dict(),
        keys.file_key(parameters["catalog"]),
    )


def _products_key(context, parameters) -> str:
    params: MasterParameters = parameters["params"]
    return keys.digest(
        "products",
        keys.code_version(),
        os.fspath(parameters["store"]),
        parameters["statistics_group"],
        parameters["fit_group"],
        os.path.abspath(parameters["output"]),
        params.as_dict(),
        parameters.get("extra_header"),
        parameters.get("plots"),
        keys.file_key(parameters["catalog"]),
        parameters.get("data_group"),
    )


def _statistics_name(parameters) -> str:
    return f"statistics {field_name(parameters['store'])}"


def _fit_name(parameters) -> str:
    return join_name("scatter fit", field_name(parameters["store"]), master_changes(parameters["params"]))


def _check_name(parameters) -> str:
    # "results/statistics-<key>" -> "check statistics": the key is a hash, meaningless in the UI.
    kind = parameters["name"].rsplit("/", 1)[-1].split("-", 1)[0]
    return f"check {kind} result"


@task(
    name="statistics",
    task_run_name=_statistics_name,
    cache_key_fn=_statistics_key,
    **IO_RETRY,
)
def compute_statistics(
    store: str, params: MasterParameters, block_bytes: int, data_group: str | None = None
) -> str:
    """Statistics with iterative rejection, out of core; returns the store group of the result.

    ``data_group``: a magnitude-fitting iteration's group to take the magnitudes from (default: the root).

    On a Dask worker (the flow was pointed at a ``distributed`` scheduler) the source blocks are spread
    over the whole cluster through ``worker_client``; elsewhere dask's local threads compute them.
    """
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        return steps.compute_statistics(store, params, block_bytes=block_bytes, data_group=data_group)
    with worker_client():
        return steps.compute_statistics(store, params, block_bytes=block_bytes, data_group=data_group)


@task(
    name="scatter-fit",
    task_run_name=_fit_name,
    cache_key_fn=_fit_key,
    **IO_RETRY,
)
def fit_statistics(store: str, statistics_group: str, catalog: str, params: MasterParameters) -> str:
    """Enough flags, fit terms, scatter fit and master selection; returns the store group of the result."""
    return steps.fit_statistics(store, statistics_group, catalog, params)


@task(
    name="master-products",
    task_run_name=write_task_name,
    cache_key_fn=_products_key,
    **IO_RETRY,
)
def write_products(
    store: str,
    statistics_group: str,
    fit_group: str,
    catalog: str,
    output: str,
    params: MasterParameters,
    extra_header: dict | None = None,
    plots: bool = True,
    data_group: str | None = None,
) -> dict:
    """Master FITS, statistics table and plots (atomic writes); returns their paths and a summary, and
    (``written_by``) the id and name of the flow run that wrote them: a cached result keeps them, so a
    later run served from the cache can name the run whose artifacts describe the products."""
    from prefect.runtime import flow_run

    products = steps.write_products(
        store,
        statistics_group,
        fit_group,
        catalog,
        output,
        params,
        extra_header=extra_header,
        plots=plots,
        data_group=data_group,
    )
    return products | {"written_by": {"id": flow_run.id, "name": flow_run.name}}


# The checks that a cached step's result is still there (a pruned store group, a deleted or overwritten
# file): tasks, so that a transient read error is retried and the check shows in the UI.


@task(name="result-exists", task_run_name=_check_name, cache_policy=NO_CACHE, **IO_RETRY)
def group_exists(store: str, name: str) -> bool:
    """Whether a cached step's result group is still in the store."""
    return groups.group_exists(store, name)


@task(name="products-intact", task_run_name="check products", cache_policy=NO_CACHE, **IO_RETRY)
def products_intact(products: dict) -> bool:
    """Whether the files of a cached :func:`write_products` result are still as it wrote them."""
    return steps.products_intact(products)
