"""The runs' artifacts in the Prefect UI: markdown summaries, tables and embedded plots.

Kept out of the flow bodies so that each flow reads as its DAG.
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from photref_core.master.parameters import MasterParameters

__all__ = [
    "image_markdown",
    "ingestion_summary_markdown",
    "master_summary_markdown",
    "publish_ingestion_summary",
    "publish_master_artifacts",
    "publish_prf_summary",
]


def image_markdown(path: str, max_bytes: int = 400_000) -> str:
    """A PNG for a markdown artifact: inline (data URI) when small, else a link to the file."""
    data = Path(path).read_bytes()
    if len(data) <= max_bytes:
        return f"![{Path(path).name}](data:image/png;base64,{base64.b64encode(data).decode()})"
    return f"[{Path(path).name}]({Path(path).as_uri()})"


def master_summary_markdown(products: dict, params: MasterParameters, term_names: list[str]) -> str:
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
        lines += ["", f"`{plot}`", "", image_markdown(plot)]
    return "\n".join(lines)


def ingestion_summary_markdown(store: str, plan, summary: dict, results) -> str:
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


def publish_ingestion_summary(store: str, plan, summary: dict, results) -> None:
    """The ingestion's markdown summary: counts, and every quarantined file with its reason."""
    create_markdown_artifact(
        ingestion_summary_markdown(store, plan, summary, results),
        key="ingestion-summary",
        description=f"Ingestion into {store}",
    )


def publish_master_artifacts(products: dict, params: MasterParameters, term_names: list[str], output) -> None:
    """The master's markdown summary (with the plots) and its per-photometry table."""
    create_markdown_artifact(
        master_summary_markdown(products, params, term_names),
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


def publish_prf_summary(store: str, output, plan, results, ingestion: dict, products: dict) -> None:
    """The PRF run's markdown summary, with the shape-model plot."""
    quarantined = [(p, q["reason"]) for p, q in plan.quarantined.items()]
    quarantined += [(r.path, r.reason) for r in results if r.reason]
    lines = [
        f"# PRF photometry of `{store}`",
        "",
        f"* images: {ingestion['frames_ingested_total']} ingested ({len(plan.skipped)} unchanged, "
        f"{len(quarantined)} quarantined now)",
        f"* sources: {products['n_sources']}; flagged (frame, source) values: {products['flagged']}",
        f"* median fraction of a source's PRF on the frame: {products['median_source_psf_fraction']:.4f}",
        f"* fluxes: `{products['fluxes']}` ({products.get('flux_set', 'static')} model)",
        *[f"* quarantined: `{p}`: {reason}" for p, reason in quarantined],
    ]
    if products.get("time_model"):
        tm = products["time_model"]
        ranges = ", ".join(f"{term} {span:.4f}" for term, span in tm["range_px"].items())
        lines.insert(
            5, f"* time model: `{tm['transform']}` transform per frame; range over the frames (px): {ranges}"
        )
    if products["plot"]:
        lines += ["", image_markdown(products["plot"])]
    create_markdown_artifact("\n".join(lines), key="prf-summary", description=f"PRF photometry {output}")
