"""Prefect tasks of the ingestion: plan (pre-pass, axes), write one frame chunk, finalise.

Each task is named after the core function it wraps (:mod:`photref_core.ingest.photometry`). The store's
per-frame markers are the cache of the ingestion (a frame already ingested from an unchanged file is
skipped by the planner), so these tasks keep no Prefect cache of their own.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from photref_core.catalog import read_catalog
from photref_core.errors import BadInputError, StoreError, is_transient
from photref_core.ingest import photometry
from photref_core.store.frames import FrameBatch, FrameResult, IngestionPlan

from .common import IO_RETRY
from .naming import batch_task_name, field_name, field_task_name


def _plan_name(parameters) -> str:
    return f"plan {field_name(parameters['store'])} ({len(parameters['frame_paths'])} files)"


__all__ = ["finalize_ingestion", "ingest_batch", "ingestion_needed", "plan_ingestion"]


@task(
    name="plan-ingestion",
    task_run_name=_plan_name,
    cache_policy=NO_CACHE,
    **IO_RETRY,
)
def plan_ingestion(
    store: str,
    frame_paths: list[str],
    catalog: str | None,
    dtype: str,
    frames_per_chunk: int | None,
    strict: bool,
) -> IngestionPlan:
    """Pre-pass over the new frames, fix the store's axes, cut the writer batches."""
    table = read_catalog(catalog) if catalog else None
    return photometry.plan_ingestion(
        store, frame_paths, catalog=table, dtype=dtype, frames_per_chunk=frames_per_chunk, strict=strict
    )


@task(
    name="ingest-frame-chunk",
    task_run_name=batch_task_name("ingest frames"),
    cache_policy=NO_CACHE,
    **IO_RETRY,
)
def ingest_batch(store: str, batch: FrameBatch, strict: bool) -> list[FrameResult]:
    """Write one frame chunk (the only writer of that chunk)."""
    return photometry.ingest_batch(store, batch, strict=strict)


@task(name="finalize-ingestion", task_run_name=field_task_name("finalize"), cache_policy=NO_CACHE)
def finalize_ingestion(store: str, results: list[FrameResult]) -> dict:
    """Record quarantines and the store's new content version."""
    return photometry.finalize_ingestion(store, results)


@task(
    name="ingestion-needed", task_run_name=field_task_name("new frames?"), cache_policy=NO_CACHE, **IO_RETRY
)
def ingestion_needed(store: str, frame_paths: list[str], catalog) -> bool:
    """Whether the ingestion has anything to do (a read-only check, much cheaper than its subflow run).

    When the check cannot tell (a store or file it cannot read, after the retries of a transient error),
    the answer is True: the ingestion then runs and reports the problem where it belongs.
    """
    try:
        return photometry.ingestion_needed(store, frame_paths, catalog)
    except (OSError, StoreError, BadInputError) as exc:
        if is_transient(exc):
            raise  # retried
        return True
