"""Prefect tasks of the magnitude-fitting loop (:mod:`photref_core.magfit.loop`) and of the light curves
(:mod:`photref_core.magfit.lightcurves`).

The loop's cache is its run group in the store (:func:`photref_core.magfit.loop.finished_run`: a loop
that finished with the same inputs, its products intact, is not run again), so the per-iteration tasks
keep no Prefect cache of their own: an iteration group is rebuilt whole when the loop runs. The master
steps inside each iteration are the master flow's tasks (:mod:`tasks.master`), cached on the iteration's
content.
"""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from photref_core import keys
from photref_core.magfit import lightcurves, loop
from photref_core.magfit.parameters import MagfitParameters
from photref_core.master.parameters import MasterParameters
from photref_core.store.schema import open_store

from .common import IO_RETRY
from .naming import field_task_name


def _iteration_name(what: str):
    """A ``task_run_name`` function: ``<what> iter<k>`` (the iteration group's last component; the run
    group before it is a hash, meaningless in the UI)."""

    def name(parameters) -> str:
        return f"{what} {parameters['iteration_group'].rsplit('/', 1)[-1]}"

    return name


def _fit_name(parameters) -> str:
    start, stop = parameters["frames"]
    iteration = parameters["iteration_group"].rsplit("/", 1)[-1]
    return f"fit {iteration} frames {start}-{stop - 1}"


__all__ = [
    "choose_reference_frame",
    "create_iteration",
    "finish_iteration",
    "finish_run",
    "finished_run",
    "fit_frame_chunk",
    "master_change",
    "run_group",
    "write_light_curves",
]

_READ = {"cache_policy": NO_CACHE, **IO_RETRY}


@task(name="magfit-run", task_run_name=field_task_name("magfit run of"), **_READ)
def run_group(
    store: str, catalog: str, output: str, params: MagfitParameters, master: MasterParameters, strict: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The run group named after every input, and the store's frame chunks (one fit task each)."""
    return loop.magfit_run_key(store, catalog, output, params, master, strict), loop.frame_chunks(store)


@task(name="magfit-finished", task_run_name=field_task_name("magfit finished?"), **_READ)
def finished_run(store: str, run_group: str) -> dict | None:
    """The summary of the same loop finished before (products intact), or None."""
    return loop.finished_run(store, run_group)


@task(name="reference-frame", task_run_name=field_task_name("reference frame of"), **_READ)
def choose_reference_frame(store: str, params: MagfitParameters) -> str:
    """FRAMEID of the first pass's reference frame."""
    return loop.choose_reference_frame(store, params)


@task(name="create-iteration", task_run_name="create iteration {k}", **_READ)
def create_iteration(store: str, run_group: str, k: int, reference: dict) -> str:
    """Create iteration ``k``'s arrays before its writers start; returns the group."""
    return loop.create_iteration(store, run_group, k, reference)


@task(name="magfit-frames", task_run_name=_fit_name, **_READ)
def fit_frame_chunk(
    store: str,
    iteration_group: str,
    catalog: str,
    params: MagfitParameters,
    frames: tuple[int, int],
    strict: bool,
) -> dict:
    """Fit one frame chunk's frames against the iteration's reference (this task owns the chunk)."""
    return loop.fit_frame_chunk(store, iteration_group, catalog, params, tuple(frames), strict)


@task(name="finish-iteration", task_run_name=_iteration_name("finish"), **_READ)
def finish_iteration(store: str, iteration_group: str, chunk_results: list[dict]) -> dict:
    """Record the iteration's quarantines; returns its summary."""
    return loop.finish_iteration(store, iteration_group, chunk_results)


@task(name="master-change", task_run_name=_iteration_name("master change"), **_READ)
def master_change(store: str, iteration_group: str, current: dict) -> list[float]:
    """Per photometry, the mean squared change of the master (mag^2): from the one the iteration was
    fitted against to the one built from it."""
    return loop.master_change(store, iteration_group, current)


@task(name="finish-magfit", task_run_name=field_task_name("record magfit of"), **_READ)
def finish_run(
    store: str, run_group: str, history: list[dict], reason: str, output: str, products: dict
) -> dict:
    """Record the loop's summary in the store and as JSON beside the master."""
    return loop.finish_run(store, run_group, history, reason, output, products)


def _light_curves_key(context, parameters) -> str:
    """What the light curves depend on: the store's content, its latest magnitude-fitting run (named after
    everything that run depends on), what is exported and where, the source list's identity, the code."""
    store = parameters["store"]
    summary = loop.latest_summary(store)
    sources = parameters.get("sources")

    def path(value):
        return None if value is None else os.path.abspath(value)

    return keys.digest(
        "light-curves",
        keys.code_version(),
        store,
        open_store(store).attrs.get("content_version", ""),
        None if summary is None else summary["run_group"],
        path(parameters.get("output")),
        parameters.get("format"),
        path(parameters.get("per_star")),
        None if sources is None else keys.file_key(sources),
        bool(parameters.get("raw")),
    )


@task(
    name="write-light-curves",
    task_run_name=field_task_name("light curves of"),
    cache_key_fn=_light_curves_key,
    **IO_RETRY,
)
def write_light_curves(
    store: str,
    output: str | None,
    format: str | None,
    per_star: str | None,
    sources: str | None,
    raw: bool,
    block_bytes: int,
) -> dict:
    """Write the light curves (one file, per-star files or both), source block by source block; ``sources``
    is the path of a file of source ids (:func:`~photref_core.magfit.lightcurves.read_source_ids`)."""
    ids = None if sources is None else lightcurves.read_source_ids(sources)
    return lightcurves.write_light_curves(
        store, output, format, per_star, ids, raw, block_bytes=block_bytes, sources_path=sources
    )
