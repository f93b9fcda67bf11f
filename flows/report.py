"""What a ``photref`` command prints when it is done: a few lines a person reads (``--json``: everything).

A command's result dictionary holds what a program wants (every path, the per-photometry rows, the file
identities that guard the cache); a person wants what was written, how many stars, whether anything was
quarantined or came from the cache, and where the run is in the UI. Each ``*_lines`` function turns one
command's result into those lines.
"""

from __future__ import annotations

import json
import os

__all__ = [
    "flow_run_url",
    "ingest_lines",
    "lightcurves_lines",
    "magfit_lines",
    "master_lines",
    "prf_lines",
    "print_result",
    "run_line",
]

#: Most quarantined files listed in the terminal (the summary artifact and the store list them all).
_MAX_LISTED = 10


def flow_run_url(flow_run_id) -> str | None:
    """The UI page of a flow run (Prefect's ``url_for``: from ``PREFECT_UI_URL``, else the API's address);
    None on the temporary server, whose address no setting names."""
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=str(flow_run_id))


def run_line(flow_run_id) -> str:
    """Where the run is: its name and UI link on a running server; on the temporary server, that it is
    gone with the command."""
    from flows.server import temporary_server_of_this_command

    name, url = _run_name(flow_run_id), flow_run_url(flow_run_id)
    if url and temporary_server_of_this_command() is None:
        return f"run: {name}  {url}"
    return (
        f"run: {name} (on a temporary Prefect server, gone with this command: `photref server start` keeps "
        "the runs and their artifacts in the UI)"
    )


def _run_name(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).name
    except Exception:  # noqa: BLE001 - a name is a nicety; the id always identifies the run
        return str(flow_run_id)


def _quarantine_lines(quarantined: list[dict]) -> list[str]:
    if not quarantined:
        return []
    lines = [f"WARNING: {len(quarantined)} file(s) quarantined:"]
    lines += [f"  {q['path']}: {q['reason']}" for q in quarantined[:_MAX_LISTED]]
    if len(quarantined) > _MAX_LISTED:
        lines.append(f"  ... {len(quarantined) - _MAX_LISTED} more (see the run's summary artifact)")
    return lines


def ingest_lines(summary: dict) -> list[str]:
    """``photref ingest``: counts and every quarantined file (at most ten)."""
    return [
        f"ingested {summary['ingested_now']} frame(s) now, {summary['skipped']} unchanged, "
        f"{len(summary['quarantined'])} quarantined; the store holds {summary['frames_ingested_total']} "
        "ingested frames",
        *_quarantine_lines(summary["quarantined"]),
    ]


def master_lines(products: dict) -> list[str]:
    """``photref master``: the files, the stars in the master per photometry, cached or not."""
    ingestion = products.get("ingestion")
    lines = [
        f"master: {products['master']}"
        + (" (unchanged: from the cache)" if products.get("cached") else " (written now)"),
        f"statistics: {products['statistics']}",
        "stars in the master: "
        + ", ".join(
            f"phot {row['photometry']}: {row['stars_in_master']}" for row in products["photometries"]
        ),
        f"frames in the statistics: {products['frames_included']} ({products['frames_excluded']} excluded)",
    ]
    if products.get("plots"):
        lines.append("plots: " + ", ".join(os.path.basename(p) for p in products["plots"]))
    if ingestion is not None:
        lines += ingest_lines(ingestion)
    return lines


def magfit_lines(summary: dict) -> list[str]:
    """``photref magfit``: how the loop ended and the final master."""
    return [
        f"magnitude fitting: {summary['stopped']} after iteration {summary['final_iteration']}",
        *master_lines(summary["master"]),
        f"history: {summary['summary']}",
    ]


def lightcurves_lines(result: dict) -> list[str]:
    """``photref lightcurves``: what was written."""
    where = " and ".join(str(p) for p in (result.get("output"), result.get("per_star")) if p)
    return [f"light curves: {result['rows']} measurements of {result['stars']} stars -> {where}"]


def prf_lines(products: dict) -> list[str]:
    """``photref prf``: the flux table, its figures, the plot."""
    ingestion = products["ingestion"]
    lines = [
        f"fluxes: {products['fluxes']} ({products.get('flux_set', 'static')} model)",
        f"stars: {products['n_sources']}, frames: {products['n_frames']}, median flux_err/flux: "
        f"{products['median_relative_error']:.4g}, flagged values: {products['flagged']}",
        f"images: {ingestion['ingested_now']} ingested now, {ingestion['skipped']} unchanged",
        *_quarantine_lines(ingestion.get("quarantined", [])),
    ]
    residuals = products.get("residuals")
    if residuals:
        lines.append(
            f"reference frame chi^2/dof over source pixels: {residuals['chi2_per_dof']:.4g} "
            f"(robust {residuals['robust_chi2_per_dof']:.4g})"
        )
    if products.get("plot"):
        lines.append(f"shape model plot: {products['plot']}")
    if products.get("chi_plot"):
        lines.append(f"chi image: {products['chi_plot']}")
    if products.get("time_plot"):
        lines.append(f"time model plot: {products['time_plot']}")
    if products.get("model_images"):
        lines.append(f"model and residual images: {products['model_images']}")
    if products.get("psf_photometry"):
        lines.append(f"psf photometry: photometry {products['psf_photometry']['photometry']} of the store")
    return lines


def print_result(result: dict, lines, as_json: bool, flow_run_id=None) -> None:
    """Print ``result`` as JSON (``as_json``), else the lines ``lines(result)`` and the run's line."""
    if as_json:
        run = {"flow_run_id": str(flow_run_id)} if flow_run_id else {}
        print(json.dumps(result | run, indent=2, default=str))
        return
    text = lines(result)
    if flow_run_id is not None:
        text.append(run_line(flow_run_id))
    print("\n".join(text))
