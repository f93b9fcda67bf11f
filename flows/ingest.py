"""Flow: fan-out ingestion of frame photometry files into the field's zarr store (SPEC 2).

DAG::

    plan-ingestion  ->  ingest-frame-chunk x N (parallel, one writer per frame chunk)  ->  finalize-ingestion
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from prefect import flow, get_run_logger

from photref_core.store.lock import store_run
from photref_core.store.schema import store_url
from tasks.ingest import finalize_ingestion, ingest_batch, plan_ingestion
from tasks.naming import artifact_key, field_name, flow_run_name

from .artifacts import INGESTION_PROGRESS, publish_ingestion_summary
from .progress import Progress
from .runners import make_task_runner, run_by_hand


def expand_frame_paths(patterns: Iterable[str]) -> list[str]:
    """Expand globs (``frames/*.fits``) and keep plain paths; sorted, duplicates removed.

    A pattern that matches nothing and is no file is kept as a path, so the planner reports it as a
    missing file instead of silently ingesting less.
    """
    paths: list[str] = []
    for pattern in patterns:
        # Made absolute before the glob, so its matches are absolute already (one abspath a pattern
        # instead of one a file: 10,000 files are a common night).
        pattern = os.path.abspath(os.fspath(pattern))
        paths.extend(glob.glob(pattern) if glob.has_magic(pattern) else [pattern])
    return sorted(dict.fromkeys(paths))


@flow(name="ingest-frames", flow_run_name=flow_run_name("ingest"), task_runner=make_task_runner())
def ingest_frames(
    store: str,
    frames: list[str],
    catalog: str | None = None,
    strict: bool = False,
    dtype: str = "f8",
    frames_per_chunk: int | None = None,
    lock_timeout: float | None = 0.0,
) -> dict:
    """Ingest frame photometry files into ``store`` (created when missing).

    Parameters
    ----------
    store : str
        Store directory or fsspec URL.
    frames : list of str
        Frame files or glob patterns.
    catalog : str, optional
        Catalog file (SPEC 1.2); stars of the catalog never seen in a frame get a source slot too.
    strict : bool
        Fail the run on the first bad frame instead of quarantining it.
    dtype : str
        Storage type of magnitudes in a new store ('f8' keeps the input exactly; 'f4' halves the size).
    frames_per_chunk : int, optional
        Frames per chunk in a new store: the unit of work of one writer task (default: ~2 MiB chunks).
    lock_timeout : float or None
        Seconds to wait for another run on the same store to finish (0: refuse at once; None: wait).

    Returns
    -------
    dict
        Counts of ingested, skipped and quarantined frames and the store's content version.
    """
    logger = get_run_logger()
    store = store_url(store)  # one spelling for cache keys, locks and reports
    with store_run(store, timeout=lock_timeout):
        paths = expand_frame_paths(frames)
        plan = plan_ingestion(store, paths, catalog, dtype, frames_per_chunk, strict)
        logger.info(
            "%d frame(s): %d to ingest in %d chunk(s), %d unchanged, %d quarantined by the pre-pass",
            len(paths),
            plan.n_to_ingest,
            len(plan.batches),
            len(plan.skipped),
            len(plan.quarantined),
        )
        futures = [ingest_batch.submit(store, batch, strict) for batch in plan.batches]
        with Progress(
            plan.n_to_ingest,
            artifact_key(INGESTION_PROGRESS, store),
            f"Ingesting {plan.n_to_ingest} frames into {field_name(store)}",
        ) as progress:
            results = progress.gather(futures)
        summary = with_quarantines(finalize_ingestion(store, results), plan, results)
        publish_ingestion_summary(store, plan, summary)
        return summary


def with_quarantines(summary: dict, plan, results) -> dict:
    """An ingestion's summary with what it skipped and every file it quarantined now, with the reason:
    by the pre-pass (``plan``) or by a writer (``results``)."""
    return summary | {
        "skipped": len(plan.skipped),
        "quarantined_by_prepass": len(plan.quarantined),
        "quarantined": [{"path": p, "reason": q["reason"]} for p, q in plan.quarantined.items()]
        + [{"path": r.path, "reason": r.reason} for r in results if r.reason],
    }


def ingest_new_frames(
    store: str, frames, catalog: str, catalog_table, strict: bool, lock_timeout
) -> dict | None:
    """Inside a flow that takes ``frames``: run the ``ingest-frames`` subflow when one of them is new or
    changed, or the catalog adds stars (the read-only ``ingestion-needed`` task decides), else log that
    the ingestion is left out. The subflow runs on the calling run's task runner (threads or the Dask
    cluster). Returns the subflow's summary, None when it did not run."""
    if not frames:
        return None
    from prefect import get_run_logger
    from prefect.context import FlowRunContext

    from tasks.ingest import ingestion_needed

    if ingestion_needed(store, expand_frame_paths(frames), catalog_table):
        runner = FlowRunContext.get().task_runner.duplicate()
        return ingest_frames.with_options(task_runner=runner)(
            store=store, frames=frames, catalog=catalog, strict=strict, lock_timeout=lock_timeout
        )
    get_run_logger().info("no new or changed frame among %s: ingestion left out", frames)
    return None


def run_ingest(store, frames, catalog=None, max_workers=None, dask_address=None, **kwargs) -> dict:
    """Run :func:`ingest_frames` by hand (see :func:`flows.runners.run_by_hand`): a chosen task runner
    (bounded threads or a Dask scheduler), no flow-run heartbeat unless one is configured."""
    return run_by_hand(
        ingest_frames,
        max_workers,
        dask_address,
        store=os.fspath(store),
        frames=[os.fspath(f) for f in frames],
        catalog=None if catalog is None else os.fspath(catalog),
        **kwargs,
    )
