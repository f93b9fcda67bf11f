"""Flow: magnitude fitting (SPEC 9), AutoWISP's loop of per-frame fits and masters, after ingesting new
frames.

DAG::

    ingestion-needed -> [ingest-frames subflow] -> magfit-run -> magfit-finished
      -> reference-frame
      -> per iteration k: create-iteration -> magfit-frames (one per frame chunk) -> finish-iteration
                          -> statistics -> scatter-fit -> master-products (master_iter<k>.fits)
                          -> master-change (k > 0)
      -> master-products (the final master, with plots) -> finish-magfit -> summary artifact

Before any task, the flow reads the catalog and checks both fit-terms expressions (the master's against
the catalog; the magnitude fit's, after the ingestion, against the catalog and the frames' columns): a bad
one fails the run at once, naming the offending text. A loop that finished before on the same inputs (the
store's content, both parameter objects, the catalog, the output) is not run again (``magfit-finished``).
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact

from photref_core.catalog import read_catalog
from photref_core.errors import retry_transient
from photref_core.magfit.loop import check_inputs, iteration_path, stop_reason
from photref_core.magfit.parameters import MagfitParameters
from photref_core.master.outofcore import DEFAULT_BLOCK_MIB
from photref_core.master.parameters import MasterParameters
from photref_core.master.steps import validate_fit_terms
from photref_core.store.lock import store_run
from photref_core.store.schema import store_url
from tasks import magfit as tasks
from tasks.naming import artifact_key, flow_run_name, master_changes

from .ingest import ingest_new_frames
from .master_photref import master_steps
from .runners import make_task_runner, run_by_hand


def magfit_summary_markdown(summary: dict) -> str:
    """The loop's history as markdown: one row per iteration."""
    lines = [
        f"# Magnitude fitting: `{summary['master']['master']}`",
        "",
        f"* {summary['stopped']}",
        f"* final fitted magnitudes: store group `{summary['final_group']}`",
        "",
        "| iteration | reference | frames fitted | quarantined | stars in fit (median) "
        "| master change (mag^2) |",
        "|---:|---|---:|---:|---|---|",
    ]
    for entry in summary["iterations"]:
        reference = f"frame `{entry['reference']['frame']}`" if "frame" in entry["reference"] else "master"
        change = ", ".join(f"{c:.3g}" for c in entry["change"]) if entry["change"] else "-"
        stars = ", ".join(f"{n:.0f}" for n in entry["median_stars_in_fit"])
        lines.append(
            f"| {entry['iteration']} | {reference} | {entry['frames_fitted']} "
            f"| {entry['frames_quarantined']} | {stars} | {change} |"
        )
    quarantined = {f: r for entry in summary["iterations"] for f, r in entry["quarantine"].items()}
    if quarantined:
        lines += ["", "## Frames quarantined by a fit", "", "| frame | reason |", "|---|---|"]
        lines += [f"| `{frame}` | {reason} |" for frame, reason in list(quarantined.items())[:500]]
    return "\n".join(lines)


@flow(
    name="magnitude-fitting",
    flow_run_name=flow_run_name("magfit", lambda p: master_changes(p.get("master"))),
    task_runner=make_task_runner(),
)
def magnitude_fitting(
    store: str,
    catalog: str,
    output: str,
    frames: list[str] | None = None,
    params: MagfitParameters = MagfitParameters(),  # noqa: B008 - frozen: one shared default is safe
    master: MasterParameters = MasterParameters(),  # noqa: B008
    strict: bool = False,
    extra_header: dict | None = None,
    block_mib: float = DEFAULT_BLOCK_MIB,
    plots: bool = True,
    lock_timeout: float | None = 0.0,
) -> dict:
    """Fit every frame's magnitudes against a reference and rebuild the master until it converges.

    Parameters
    ----------
    store : str
        The field's store (directory or fsspec URL).
    catalog : str
        Catalog file (SPEC 1.2): the variables of both fit-terms expressions.
    output : str
        The final master's FITS path; beside it the statistics table, the plots, every iteration's master
        (``<name>_iter<k>.fits``) and the loop's summary (``<name>_magfit.json``).
    frames : list of str, optional
        Raw frame files or globs to ingest first (only new or changed ones are read).
    params : MagfitParameters
        The loop and the per-frame fit (SPEC 9).
    master : MasterParameters
        The master built in every iteration (SPEC 3-5).
    strict : bool
        Fail on a bad frame (at ingestion, or a fit that fails) instead of quarantining it.
    extra_header : dict, optional
        Keywords for the masters' primary headers.
    block_mib : float
        Memory budget of one out-of-core source block of the statistics, in MiB.
    plots : bool
        Write the final master's plots.
    lock_timeout : float or None
        Seconds to wait for another run on the same store to finish (0: refuse at once; None: wait).

    Returns
    -------
    dict
        The loop's summary (:func:`photref_core.magfit.loop.finish_run`).
    """
    logger = get_run_logger()
    store, catalog, output = store_url(store), os.path.abspath(catalog), os.path.abspath(output)
    catalog_table = retry_transient(read_catalog, catalog)
    validate_fit_terms(master.fit_terms, catalog_table)
    with store_run(store, timeout=lock_timeout):
        ingest_new_frames(store, frames, catalog, catalog_table, strict, lock_timeout)
        check_inputs(store, catalog_table, params)

        run_group, chunks = tasks.run_group(store, catalog, output, params, master, strict)
        done = tasks.finished_run(store, run_group)
        if done is not None:
            logger.info("magnitude fitting unchanged (%s): nothing to do", done["stopped"])
            return done

        reference: dict = {"frame": tasks.choose_reference_frame(store, params)}
        history: list[dict] = []
        k = 0
        while True:
            group = tasks.create_iteration(store, run_group, k, reference)
            # All but the frame chunk are the same for every task (a parameters object is iterable).
            fits = tasks.fit_frame_chunk.map(
                unmapped(store),
                unmapped(group),
                unmapped(catalog),
                unmapped(params),
                chunks,
                unmapped(strict),
            )
            entry = {"iteration": k, "group": group, "reference": reference}
            entry.update(tasks.finish_iteration(store, group, [f.result() for f in fits]))
            master_output = str(iteration_path(output, k))
            stats, fit, products, _ = master_steps(
                store, catalog, master_output, master, block_mib, extra_header, False, group, f"iter{k}"
            )
            current = {"statistics": stats, "fit": fit}
            change = tasks.master_change(store, group, current) if k > 0 else None
            entry.update(master=products["master"], statistics=stats, fit=fit, change=change)
            history.append(entry)
            logger.info(
                "iteration %d: %d frames fitted, %d quarantined, master change %s",
                k,
                entry["frames_fitted"],
                entry["frames_quarantined"],
                change,
            )
            reason = stop_reason(k, change, params)
            if reason is not None:
                break
            reference, k = current, k + 1
        logger.info("stopped: %s", reason)
        *_, final, _ = master_steps(
            store, catalog, output, master, block_mib, extra_header, plots, group, f"iter{k}"
        )
        summary = tasks.finish_run(store, run_group, history, reason, output, final)
        create_markdown_artifact(
            magfit_summary_markdown(summary),
            key=artifact_key("magfit-summary", store),
            description=f"Magnitude fitting {output}",
        )
        return summary


def run_magfit(store, catalog, output, max_workers=None, dask_address=None, **kwargs) -> dict:
    """Run :func:`magnitude_fitting` by hand (see :func:`flows.runners.run_by_hand`)."""
    return run_by_hand(
        magnitude_fitting,
        max_workers,
        dask_address,
        store=os.fspath(store),
        catalog=os.fspath(catalog),
        output=os.fspath(output),
        **kwargs,
    )
