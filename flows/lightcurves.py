"""Flow: light curves out of a store (SPEC 9), from its last magnitude-fitting run (or the raw
magnitudes).

DAG::

    write-light-curves (cached: same store content, same magfit run, same request, files intact)
      -> light-curves summary artifact

The request is checked before the task (an output or a per-star directory, a known format, a readable
source list), so a bad one fails the run at once, naming the problem. The store's run lock is held while
reading: an ingestion or a magnitude fit of the same store waits, or is refused, meanwhile.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from photref_core.magfit.lightcurves import FLAG_BITS, light_curve_request, read_source_ids
from photref_core.master.outofcore import DEFAULT_BLOCK_MIB
from photref_core.store.lock import store_run
from photref_core.store.schema import store_url
from tasks.magfit import write_light_curves
from tasks.master import products_intact
from tasks.naming import artifact_key, flow_run_name

from .master_photref import run_cached_step
from .runners import make_task_runner, run_by_hand


def light_curves_markdown(result: dict) -> str:
    """What was written, from where, and what the flag bits mean."""
    lines = [
        f"# Light curves of `{result['store']}`",
        "",
        f"* {result['rows']} measurements of {result['stars']} stars, {result['magnitudes']} magnitudes "
        f"({result['format']})",
    ]
    if result["output"]:
        lines.append(f"* file: `{result['output']}`")
    if result["per_star"]:
        lines.append(f"* one file per star in `{result['per_star']}`")
    lines += ["", "| flag bit | meaning |", "|---:|---|"]
    lines += [f"| {bit} | {text} |" for bit, text in FLAG_BITS.items()]
    return "\n".join(lines)


@flow(name="light-curves", flow_run_name=flow_run_name("light curves"), task_runner=make_task_runner())
def export_light_curves(
    store: str,
    output: str | None = None,
    format: str | None = None,
    per_star: str | None = None,
    sources: str | None = None,
    raw: bool = False,
    block_mib: float = DEFAULT_BLOCK_MIB,
    lock_timeout: float | None = 0.0,
) -> dict:
    """Write the light curves of a store: one row per (frame, source) measurement, sorted by source, then
    time (:mod:`photref_core.magfit.lightcurves`).

    Parameters
    ----------
    store : str
        The field's store, after ``photref magfit`` (or any ingested store with ``raw``).
    output : str, optional
        The file of all rows (FITS or parquet).
    format : {'fits', 'parquet'}, optional
        Default: from ``output``'s name.
    per_star : str, optional
        A directory for one file per star, named by its source_id.
    sources : str, optional
        A text file of source ids (one per line): only those stars.
    raw : bool
        The raw magnitudes instead of the final fitted ones.
    block_mib : float
        Working memory of a block of sources, in MiB (a store of more than one block is first copied,
        source-major, to a scratch directory beside the output).
    lock_timeout : float or None
        Seconds to wait for another run on the same store to finish (0: refuse at once; None: wait).

    Returns
    -------
    dict
        What was written (:func:`photref_core.magfit.lightcurves.write_light_curves`).
    """
    logger = get_run_logger()
    format = light_curve_request(output, per_star, format)
    store = store_url(store)
    output = None if output is None else os.path.abspath(output)
    per_star = None if per_star is None else os.path.abspath(per_star)
    if sources is not None:
        sources = os.path.abspath(sources)
        read_source_ids(sources)  # a bad list fails here, before any work
    block_bytes = max(1, int(block_mib * 2**20))
    with store_run(store, timeout=lock_timeout):
        result, unchanged = run_cached_step(
            write_light_curves, (store, output, format, per_star, sources, raw, block_bytes), products_intact
        )
    logger.info(
        "%s: %d measurements of %d stars%s",
        result["output"] or result["per_star"],
        result["rows"],
        result["stars"],
        " (unchanged)" if unchanged else "",
    )
    create_markdown_artifact(
        light_curves_markdown(result),
        key=artifact_key("light-curves-summary", store),
        description=f"Light curves of {store}",
    )
    return result


def run_lightcurves(store, output=None, max_workers=None, dask_address=None, **kwargs) -> dict:
    """Run :func:`export_light_curves` by hand (see :func:`flows.runners.run_by_hand`)."""
    return run_by_hand(
        export_light_curves,
        max_workers,
        dask_address,
        store=os.fspath(store),
        output=None if output is None else os.fspath(output),
        **kwargs,
    )
