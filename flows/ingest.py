"""Flow: fan-out ingestion of frame photometry files into the field's zarr store (SPEC 2).

DAG::

    plan-ingestion  ->  ingest-frame-chunk x N (parallel, one writer per frame chunk)  ->  finalize-ingestion
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed

from photref_core.store import store_lock
from tasks.ingest import finalize_ingestion, ingest_frame_chunk, plan_ingestion

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


def _summary_markdown(store: str, plan, summary: dict, results) -> str:
    lines = [
        f"# Ingestion into `{store}`",
        "",
        "| | frames |",
        "|---|---:|",
        f"| ingested now | {summary['ingested_now']} |",
        f"| skipped (already ingested, file unchanged) | {len(plan.skipped)} |",
        f"| quarantined now | {summary['quarantined_now'] + len(plan.quarantined)} |",
        f"| in the store | {summary['frames_in_store']} ({summary['frames_ingested_total']} ingested) |",
        "",
        f"Sources: {plan.n_sources}; photometries: {plan.n_photometries}; "
        f"content version `{summary['content_version']}`.",
    ]
    bad = [(p, q["reason"]) for p, q in plan.quarantined.items()]
    bad += [(r.path, r.reason) for r in results if r.reason]
    if bad:
        lines += ["", "## Quarantined", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{p}` | {reason} |" for p, reason in bad[:500]]
        if len(bad) > 500:
            lines.append(f"| ... | {len(bad) - 500} more |")
    return "\n".join(lines)


@flow(name="ingest-frames", flow_run_name="ingest {store}", task_runner=make_task_runner())
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
    store = os.fspath(store)
    with store_lock(store, timeout=lock_timeout):
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
        progress = Progress(
            plan.n_to_ingest, "ingestion-progress", f"Ingesting {plan.n_to_ingest} frames into {store}"
        )
        futures = [ingest_frame_chunk.submit(store, batch, strict) for batch in plan.batches]
        results = []
        for future in as_completed(futures):
            batch_results = future.result()
            results.extend(batch_results)
            progress.advance(len(batch_results))
        progress.finish()
        summary = finalize_ingestion(store, results)
        summary.update(
            skipped=len(plan.skipped),
            quarantined_by_prepass=len(plan.quarantined),
            quarantined=[{"path": p, "reason": q["reason"]} for p, q in plan.quarantined.items()]
            + [{"path": r.path, "reason": r.reason} for r in results if r.reason],
        )
        create_markdown_artifact(
            _summary_markdown(store, plan, summary, results),
            key="ingestion-summary",
            description=f"Ingestion into {store}",
        )
        return summary


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
