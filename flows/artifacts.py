"""The runs' artifacts in the Prefect UI: markdown summaries, tables and embedded plots.

Kept out of the flow bodies so that each flow reads as its DAG. Every key is per field
(:func:`tasks.naming.artifact_key`: ``master-summary-field-zarr-3f9a1c``), so two fields never overwrite
each other's latest summary; the kinds are the constants below. A run that quarantined anything says so
at the top of its summary, logs a warning and is tagged ``quarantined`` (a filter of the UI's run list).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run as runtime_flow_run

from flows.report import flow_run_url
from photref_core.master.parameters import MasterParameters
from tasks.naming import artifact_key, field_name

__all__ = [
    "IMAGE_PROGRESS",
    "INGESTION_PROGRESS",
    "INGESTION_SUMMARY",
    "MASTER_SUMMARY",
    "MASTER_TABLE",
    "NIGHTLY_SUMMARY",
    "PRF_PROGRESS",
    "PRF_SUMMARY",
    "PRF_TABLE",
    "QUARANTINE_TAG",
    "flow_run_link",
    "image_markdown",
    "ingestion_summary_markdown",
    "master_summary_markdown",
    "master_table_rows",
    "nightly_summary_markdown",
    "publish_ingestion_summary",
    "publish_master_artifacts",
    "publish_nightly_summary",
    "publish_prf_summary",
    "round_sig",
    "tag_flow_run",
]

INGESTION_SUMMARY = "ingestion-summary"
INGESTION_PROGRESS = "ingestion-progress"
MASTER_SUMMARY = "master-summary"
MASTER_TABLE = "master-table"
NIGHTLY_SUMMARY = "nightly-summary"
PRF_SUMMARY = "prf-summary"
PRF_TABLE = "prf-table"
PRF_PROGRESS = "prf-fit-progress"
IMAGE_PROGRESS = "image-ingestion-progress"

#: The tag a run gets when it quarantined anything.
QUARANTINE_TAG = "quarantined"

#: Most rows of a quarantine list in a summary (the store's ``frames`` listing has them all).
_MAX_LISTED = 500

#: Largest embedded PNG: a markdown artifact is stored in the server's database and sent whole to the UI.
_MAX_IMAGE_BYTES = 300_000


def round_sig(value, digits: int = 4):
    """``value`` rounded to ``digits`` significant digits (ints, text and non-finite values unchanged)."""
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def flow_run_link(run_id: str, name: str) -> str:
    """A markdown link to a flow run's page in the UI (relative to the UI when no address is known)."""
    return f"[{name}]({flow_run_url(run_id) or f'/runs/flow-run/{run_id}'})"


def tag_flow_run(tag: str) -> None:
    """Add ``tag`` to the current flow run (shown in the UI's run list, and a filter there)."""
    from prefect.client.orchestration import get_client

    run_id = runtime_flow_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if tag not in run.tags:
            client.update_flow_run(run_id, tags=[*run.tags, tag])


def _png_bytes(path: str, max_bytes: int) -> bytes:
    """The PNG's bytes, halved in each dimension (matplotlib) until at most ``max_bytes``."""
    data = Path(path).read_bytes()
    if len(data) <= max_bytes:
        return data
    import matplotlib.image as mpimg

    pixels = mpimg.imread(path)
    while len(data) > max_bytes and min(pixels.shape[:2]) > 64:
        pixels = pixels[::2, ::2]
        buffer = io.BytesIO()
        mpimg.imsave(buffer, pixels, format="png")
        data = buffer.getvalue()
    return data


def image_markdown(path: str, max_bytes: int = _MAX_IMAGE_BYTES) -> str:
    """A PNG embedded in a markdown artifact (a data URI: a ``file://`` link does not open from the UI),
    shrunk to at most ``max_bytes``; the file's path under it."""
    data = _png_bytes(path, max_bytes)
    return f"![{Path(path).name}](data:image/png;base64,{base64.b64encode(data).decode()})\n\n`{path}`"


def _warning_line(n_quarantined: int, what: str = "file(s)") -> list[str]:
    if not n_quarantined:
        return []
    return [
        "",
        f"> **Warning: {n_quarantined} {what} quarantined by this run** (the reasons are listed below).",
    ]


def _quarantine_lines(quarantined: list[tuple[str, str]]) -> list[str]:
    if not quarantined:
        return []
    lines = ["", "## Quarantined", "", "| file | reason |", "|---|---|"]
    lines += [f"| `{path}` | {reason} |" for path, reason in quarantined[:_MAX_LISTED]]
    if len(quarantined) > _MAX_LISTED:
        lines.append(f"| ... | {len(quarantined) - _MAX_LISTED} more |")
    return lines


def _quarantined(ingestion: dict | None) -> list[tuple[str, str]]:
    """(path, reason) of every file an ingestion summary quarantined now."""
    return [(q["path"], q["reason"]) for q in (ingestion or {}).get("quarantined", [])]


def _warn_and_tag(n_bad: int, where: str) -> None:
    if n_bad:
        get_run_logger().warning("%d file(s) quarantined: see the %s", n_bad, where)
        tag_flow_run(QUARANTINE_TAG)


def _ingestion_lines(ingestion: dict | None, frames_given: bool) -> list[str]:
    """One line on what the run's ingestion did (``ingestion``: the ``ingest-frames`` summary)."""
    if ingestion is None:
        if not frames_given:
            return ["* ingestion: no frames given (the store as it was)"]
        return ["* ingestion: left out (no new or changed frame)"]
    return [
        f"* ingestion: {ingestion['ingested_now']} ingested now, {ingestion['skipped']} unchanged "
        f"(skipped), {len(ingestion['quarantined'])} quarantined now; the store holds "
        f"{ingestion['frames_ingested_total']} ingested frames "
        f"({ingestion['frames_quarantined_total']} quarantined in all)"
    ]


def ingestion_summary_markdown(store: str, plan, summary: dict) -> str:
    """The ingestion's summary: counts, a warning when anything was quarantined, every reason."""
    bad = _quarantined(summary)
    lines = [
        f"# Ingestion into `{field_name(store)}`",
        *_warning_line(len(bad)),
        "",
        "| | frames |",
        "|---|---:|",
        f"| ingested now | {summary['ingested_now']} |",
        f"| skipped (already ingested, file unchanged) | {len(plan.skipped)} |",
        f"| quarantined now | {len(bad)} |",
        f"| in the store | {summary['frames_in_store']} ({summary['frames_ingested_total']} ingested) |",
        "",
        f"Store `{store}`; sources: {plan.n_sources}; photometries: {plan.n_photometries}; "
        f"content version `{summary['content_version']}`.",
        *_quarantine_lines(bad),
    ]
    return "\n".join(lines)


def publish_ingestion_summary(store: str, plan, summary: dict) -> None:
    """The ingestion's markdown summary; a run that quarantined anything logs a warning and is tagged."""
    _warn_and_tag(len(summary["quarantined"]), "ingestion summary")
    create_markdown_artifact(
        ingestion_summary_markdown(store, plan, summary),
        key=artifact_key(INGESTION_SUMMARY, store),
        description=f"Ingestion into {field_name(store)}",
    )


def _parameters_lines(params: MasterParameters, block_mib: float | None) -> list[str]:
    lines = [
        "| step | parameters |",
        "|---|---|",
        f"| statistics (SPEC 3) | rejection at {params.outlier_threshold:g} {params.rejection_units} around "
        f"the {params.rejection_center}, at most {params.max_rejection_iterations} iterations; enough "
        f"points: > {params.min_nobs_median_fraction:g} x the median kept count |",
        f"| scatter fit (SPEC 4) | `{params.fit_terms}` on log10 {params.scatter_quantity}; rejection "
        f"beyond {params.fit_outlier_threshold:g} x the {params.fit_outlier_average} residual, at most "
        f"{params.fit_max_rej_iter} iterations |",
        f"| master (SPEC 5) | scatter excess at most {params.fit_outlier_threshold:g} x the "
        f"{params.fit_outlier_average} absolute excess |",
    ]
    if block_mib is not None:
        lines.append(f"| out of core | source blocks of {block_mib:g} MiB |")
    return lines


def master_summary_markdown(
    store: str,
    products: dict,
    params: MasterParameters,
    term_names: list[str],
    frames_given: bool = False,
    block_mib: float | None = None,
) -> str:
    """The master's summary: what the ingestion did (``products['ingestion']``, the ``ingest-frames``
    summary, None when it did not run), the products, the parameters, per-photometry counts, the
    quarantined files and the plots."""
    ingestion = products.get("ingestion")
    bad = _quarantined(ingestion)
    lines = [
        f"# Master photometric reference `{Path(products['master']).name}` of `{field_name(store)}`",
        *_warning_line(len(bad)),
        "",
        *_ingestion_lines(ingestion, frames_given),
        f"* master: `{products['master']}`",
        f"* statistics table: `{products['statistics']}`",
        f"* frames in the statistics: {products['frames_included']}, excluded: {products['frames_excluded']}",
        f"* fit terms: `{params.fit_terms}` -> {', '.join(term_names)}",
        "",
        *_parameters_lines(params, block_mib),
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
    lines += _quarantine_lines(bad)
    for plot in products["plots"]:
        lines += ["", image_markdown(plot)]
    return "\n".join(lines)


def master_table_rows(products: dict, term_names: list[str]) -> list[dict]:
    """The per-photometry table: short headers, values to 4 significant digits, one column per fit term
    (``c[term]``, the term's coefficient)."""
    rows = []
    for row in products["photometries"]:
        out = {
            "phot": row["photometry"],
            "measured": row["stars_measured"],
            "enough": row["stars_enough"],
            "in fit": row["stars_in_fit"],
            "rejected": row["stars_rejected_by_fit"],
            "in master": row["stars_in_master"],
            "rms dex": round_sig(row["fit_rms_dex"]),
            "fits": row["n_fits"],
        }
        out |= {f"c[{name}]": round_sig(c) for name, c in zip(term_names, row["coefficients"], strict=True)}
        rows.append(out)
    return rows


def publish_master_artifacts(
    store: str,
    products: dict,
    params: MasterParameters,
    term_names: list[str],
    frames_given: bool = False,
    block_mib: float | None = None,
) -> None:
    """The master's markdown summary (ingestion, parameters, counts, plots) and its per-photometry table.
    A run whose ingestion quarantined anything logs a warning and is tagged."""
    _warn_and_tag(len(_quarantined(products.get("ingestion"))), "master summary")
    create_markdown_artifact(
        master_summary_markdown(store, products, params, term_names, frames_given, block_mib),
        key=artifact_key(MASTER_SUMMARY, store),
        description=f"Master photometric reference of {field_name(store)}: {products['master']}",
    )
    create_table_artifact(
        master_table_rows(products, term_names),
        key=artifact_key(MASTER_TABLE, store),
        description=f"Per-photometry scatter fit of {field_name(store)} (c[term]: the fit's coefficients)",
    )


def unchanged_line(store: str, products: dict) -> str:
    """One line for a run whose master came from the cache: unchanged since the run that wrote it."""
    writer = products.get("written_by") or {}
    since = flow_run_link(writer["id"], writer["name"]) if writer.get("id") else "an earlier run"
    return (
        f"Master `{Path(products['master']).name}` of `{field_name(store)}` unchanged since run {since} "
        "(no new or changed frame, same parameters)."
    )


def nightly_summary_markdown(settings, products: dict) -> str:
    """The night: what was ingested and quarantined (with the reasons), and the master."""
    ingestion = products.get("ingestion")
    bad = _quarantined(ingestion)
    lines = [
        f"# Nightly master of `{field_name(settings.store)}`",
        *_warning_line(len(bad)),
        "",
        f"* frames: `{settings.frames_glob}` into `{settings.store}`",
        *_ingestion_lines(ingestion, True),
        f"* master: `{products['master']}` (statistics table `{products['statistics']}`)"
        + (" unchanged (from the cache)" if products.get("cached") else ""),
        f"* frames in the statistics: {products['frames_included']}, excluded: {products['frames_excluded']}",
        "",
        "The ingestion and master summaries, tables and plots are artifacts of the `ingest-frames` and "
        "`master-photref` subflow runs.",
        *_quarantine_lines(bad),
    ]
    return "\n".join(lines)


def publish_nightly_summary(settings, products: dict) -> None:
    """The night's summary; when the master came from the cache and nothing was quarantined, one line
    naming (and linking) the run that wrote it, so that the latest version of the key tells the truth. A
    night that quarantined anything logs a warning and is tagged."""
    n_bad = len(_quarantined(products.get("ingestion")))
    _warn_and_tag(n_bad, "nightly summary")
    if products.get("cached") and not n_bad:
        text = unchanged_line(settings.store, products)
    else:
        text = nightly_summary_markdown(settings, products)
    create_markdown_artifact(
        text,
        key=artifact_key(NIGHTLY_SUMMARY, settings.store),
        description=f"Nightly master of {field_name(settings.store)}",
    )


def publish_prf_summary(store: str, output, plan, ingestion: dict, products: dict, params) -> None:
    """The PRF run's markdown summary with the shape-model plot embedded, and a small table of figures."""
    quarantined = _quarantined(ingestion)
    _warn_and_tag(len(quarantined), "PRF summary")
    lines = [
        f"# PRF photometry of `{field_name(store)}`",
        *_warning_line(len(quarantined), "image(s)"),
        "",
        f"* images: {ingestion['ingested_now']} ingested now, {len(plan.skipped)} unchanged, "
        f"{len(quarantined)} quarantined now; {ingestion['frames_ingested_total']} in the store",
        f'* shape model: r {params.rmin:g}-{params.rmax:g}", {params.n_r_knots} x {params.n_phi_knots} '
        f'knots, cut_r {params.cut_r:g}", neighbourhood {params.sparse_dist_lim:g}"',
        f"* sources: {products['n_sources']}; frames: {products['n_frames']}; flagged (frame, source) "
        f"values: {products['flagged']}",
        f"* median fraction of a source's PRF on the frame: {products['median_source_psf_fraction']:.4f}",
        f"* fluxes: `{products['fluxes']}` ({products.get('flux_set', 'static')} model)",
    ]
    if products.get("time_model"):
        tm = products["time_model"]
        ranges = ", ".join(f"{term} {span:.4f}" for term, span in tm["range_px"].items())
        lines.append(
            f"* time model: `{tm['transform']}` transform per frame; range over the frames (px): {ranges}"
        )
        if tm.get("perturbation"):
            lines.append(
                "* PRF shape change (perturbation): median over sources of the perturbed / mean model "
                f"light {tm['median_perturbed_ratio_mean']:.4f}, its median std over time "
                f"{tm['median_perturbed_std']:.4f}"
            )
    residuals = products.get("residuals")
    if residuals:
        lines.append(
            f"* reference frame (mean of {residuals['frames']} frame(s)): chi^2/dof over "
            f"{residuals['source_pixels']} source pixels {residuals['chi2_per_dof']:.4g}, robust "
            f"{residuals['robust_chi2_per_dof']:.4g} (1: the pixels explained within their errors)"
        )
    if products.get("model_images"):
        lines.append(f"* model and residual images: `{products['model_images']}`")
    lines += _quarantine_lines(quarantined)
    if products["plot"]:
        lines += ["", image_markdown(products["plot"])]
    if products.get("chi_plot"):
        lines += ["", image_markdown(products["chi_plot"])]
    if products.get("time_plot"):
        lines += ["", image_markdown(products["time_plot"])]
    create_markdown_artifact(
        "\n".join(lines), key=artifact_key(PRF_SUMMARY, store), description=f"PRF photometry {output}"
    )
    figures = {
        "stars": products["n_sources"],
        "frames": products["n_frames"],
        "median flux_err/flux": round_sig(products["median_relative_error"]),
        **(
            {"robust chi^2/dof (reference frame)": round_sig(products["residuals"]["robust_chi2_per_dof"])}
            if products.get("residuals")
            else {}
        ),
        **{f"flag {name}": n for name, n in products["flag_counts"].items()},
        "images quarantined now": len(quarantined),
    }
    create_table_artifact(
        [{"figure": k, "value": v} for k, v in figures.items()],
        key=artifact_key(PRF_TABLE, store),
        description=f"PRF photometry of {field_name(store)}",
    )
