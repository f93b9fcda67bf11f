"""AutoWISP's magnitude-fitting loop over a store (SPEC 9), step by step.

Iteration 0 fits every frame against one reference frame; iteration k > 0 against the master built from
iteration k - 1's fitted magnitudes (the SPEC 3-5 chain of :mod:`photref_core.master.steps`, run on the
iteration's group); the loop stops when the master has converged (:func:`master_change`,
:func:`stop_reason`) or after ``max_magfit_iterations`` passes.

Where the results live (see :mod:`photref_core.store.schema`)::

    magfit                       attrs: latest (the run group of the last finished loop)
    magfit/run-<key>             attrs: summary (:func:`finish_run`: the history, one entry per
                                 iteration, why the loop stopped, the final group and master)
    magfit/run-<key>/iter<k>     mag, mag_err (frame, source, photometry): iteration k's fitted
                                 magnitudes and their errors (the raw errors); fitted (frame,): frames
                                 the iteration fitted; reference_mag (source, photometry): what it was
                                 fitted against; attrs: content_version, reference, quarantine

``<key>`` names everything the loop's results depend on (the store's content, both parameter objects, the
catalog file, the output, the code), so a run with other parameters never overwrites another's while it
runs; when a run finishes, the groups of every other run are removed (each holds a copy of the
magnitudes per iteration). The iteration arrays have the root's frame chunks: one writer per frame chunk
(:func:`fit_frame_chunk`), as the ingestion.

The steps, in the order the flow (``flows/magfit.py``) and :func:`magnitude_fit` run them:
:func:`check_inputs`, :func:`choose_reference_frame`, then per iteration :func:`create_iteration`,
:func:`fit_frame_chunk` for every frame chunk, :func:`finish_iteration`, the master chain, and
:func:`master_change`; at the end :func:`finish_run`. :func:`finished_run` recognises a loop already
run on the same inputs.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from astropy.table import Table

from .._atomic import atomic_write
from ..catalog import read_catalog
from ..errors import BadInputError, FitTermsError
from ..ingest.readers import valid_measurements
from ..keys import code_version, digest, file_key
from ..master.fitterms import FitTerms, parse_fit_terms
from ..master.parameters import MasterParameters
from ..master.steps import beside_master, catalog_columns, load_results
from ..store.frames import frame_states
from ..store.schema import (
    INGESTED,
    SOURCE_COLUMNS_GROUP,
    committed_sizes,
    open_group,
    open_store,
    source_column_names,
    store_url,
)
from .fit import fit_photometry, frame_design
from .parameters import MagfitParameters

__all__ = [
    "MAGFIT_GROUP",
    "check_inputs",
    "choose_reference_frame",
    "create_iteration",
    "finish_iteration",
    "finish_run",
    "finished_run",
    "fit_frame_chunk",
    "frame_chunks",
    "iteration_path",
    "latest_summary",
    "magfit_run_key",
    "magnitude_fit",
    "master_change",
    "reference_magnitudes",
    "stop_reason",
    "summary_path",
]

MAGFIT_GROUP = "magfit"


def magfit_run_key(
    store, catalog_path, output, params: MagfitParameters, master: MasterParameters, strict: bool = False
) -> str:
    """The run group's name, ``magfit/run-<key>``: the store's content, both parameter objects, the catalog
    file's identity, the output (the iterations' masters are written beside it), strict mode and the code
    version."""
    version = open_store(store).attrs.get("content_version", "")
    key = digest(
        "magfit",
        code_version(),
        version,
        params.as_dict(),
        master.as_dict(),
        file_key(catalog_path),
        os.path.abspath(output),
        bool(strict),
    )
    return f"{MAGFIT_GROUP}/run-{key}"


def iteration_path(output, k: int) -> Path:
    """Iteration ``k``'s master beside the final one: ``master.fits`` -> ``master_iter<k>.fits``."""
    return beside_master(output, f"_iter{k}.fits")


def summary_path(output) -> Path:
    """The loop's JSON summary beside the master: ``master.fits`` -> ``master_magfit.json``."""
    return beside_master(output, "_magfit.json")


def check_inputs(store, catalog, params: MagfitParameters) -> FitTerms:
    """Check, before any work, that every variable of ``magfit_terms`` exists: a catalog column, a frame
    column kept by the store (``x``, ``y``, ...) or ``magnitude``.

    Raises
    ------
    FitTermsError
        Naming the unknown column(s) and listing those available.
    """
    terms = parse_fit_terms(params.magfit_terms)
    if not isinstance(catalog, Table):
        catalog = read_catalog(catalog)
    frame_columns = source_column_names(open_store(store))
    try:
        terms.check_columns([*catalog.colnames, *frame_columns, "magnitude"])
    except FitTermsError as exc:
        raise FitTermsError(
            f"magfit_terms: {exc} (frame columns: {', '.join(frame_columns) or 'none'})"
        ) from None
    return terms


def _good_counts(group, n_frames: int, n_src: int, params: MagfitParameters) -> np.ndarray:
    """Per frame and photometry: catalog stars measured with ``0 < mag_err <= max_mag_err``."""
    in_catalog = group["in_catalog"][:n_src]
    counts = np.zeros((n_frames, group["mag"].shape[2]), np.int64)
    chunk = group["mag"].chunks[0]
    for lo in range(0, n_frames, chunk):
        hi = min(lo + chunk, n_frames)
        mag = group["mag"][lo:hi, :n_src]
        err = group["mag_err"][lo:hi, :n_src]
        with np.errstate(invalid="ignore"):
            good = valid_measurements(mag, err) & (err <= params.max_mag_err)
        counts[lo:hi] = (good & in_catalog[None, :, None]).sum(axis=1)
    return counts


def choose_reference_frame(store, params: MagfitParameters) -> str:
    """The first pass's reference: ``params.reference_frame``, or the ingested frame with the most good
    measurements of catalog stars (summed over photometries; ties: the earliest slot).

    Raises
    ------
    BadInputError
        When the named frame is not an ingested frame of the store, when no frame is ingested, or when the
        reference has fewer good catalog stars in a photometry than a fit of the terms needs
        (``min_stars_per_term`` x terms): every frame's first fit would fail.
    """
    group = open_store(store)
    n_frames, n_src = committed_sizes(group)
    states = frame_states(group, n_frames)
    frame_ids = group["frame_id"][:n_frames]
    ingested = states == INGESTED
    if not ingested.any():
        raise BadInputError(store_url(store), "no ingested frame to fit")
    counts = _good_counts(group, n_frames, n_src, params)
    if params.reference_frame is not None:
        slots = np.flatnonzero((frame_ids == params.reference_frame) & ingested)
        if slots.size == 0:
            raise BadInputError(
                store_url(store), f"reference_frame {params.reference_frame!r} is not an ingested frame"
            )
        slot = int(slots[0])
    else:
        slot = int(np.argmax(np.where(ingested, counts.sum(axis=1), -1)))
    needed = params.min_stars(parse_fit_terms(params.magfit_terms).n_terms)
    worst = int(np.argmin(counts[slot]))
    if counts[slot, worst] < needed:
        raise BadInputError(
            str(frame_ids[slot]),
            f"as the reference frame it has {counts[slot, worst]} good catalog stars in photometry {worst}; "
            f"the magfit terms need {needed} (min_stars_per_term x terms): choose another reference_frame, "
            "fewer terms or a lower min_stars_per_term",
        )
    return str(frame_ids[slot])


def reference_magnitudes(store, reference: dict) -> np.ndarray:
    """The reference magnitudes ``(sources, photometries)`` (NaN where a star has none).

    Parameters
    ----------
    reference : dict
        ``{"frame": FRAMEID}`` (a frame's raw magnitudes) or ``{"statistics": GROUP, "fit": GROUP}`` (a
        master: the rejected centre of the stars in it).
    """
    group = open_store(store)
    n_frames, n_src = committed_sizes(group)
    if "frame" in reference:
        slot = int(np.flatnonzero(group["frame_id"][:n_frames] == reference["frame"])[0])
        return group["mag"][slot, :n_src].astype(np.float64)
    results = load_results(store, reference["statistics"], reference["fit"])
    return np.where(results["in_master"].values, results["magnitude"].values, np.nan)


def create_iteration(store, run_group: str, k: int, reference: dict) -> str:
    """Create iteration ``k``'s group (arrays at full size, the root's chunks) before its writers start.

    Returns
    -------
    str
        The group's path in the store.
    """
    root = open_store(store, "r+")
    n_frames, n_src = committed_sizes(root)
    name = f"{run_group}/iter{k}"
    if name in root:
        del root[name]
    group = root.require_group(name)
    mag = root["mag"]
    for array in ("mag", "mag_err"):
        group.create_array(
            array,
            shape=(n_frames, n_src, mag.shape[2]),
            chunks=mag.chunks,
            dtype=mag.dtype,
            fill_value=np.nan,
            dimension_names=["frame", "source", "photometry"],
            compressors=mag.compressors,
        )
    group.create_array(
        "fitted",
        shape=(n_frames,),
        chunks=(mag.chunks[0],),
        dtype=bool,
        fill_value=False,
        dimension_names=["frame"],
    )
    # The reference magnitudes, resolved once here (a master's are read from its result groups) and kept:
    # what this iteration was fitted against, read by every writer.
    values = reference_magnitudes(store, reference)
    saved = group.create_array(
        "reference_mag",
        shape=values.shape,
        dtype="f8",
        fill_value=np.nan,
        dimension_names=["source", "photometry"],
    )
    saved[:] = values
    group.attrs.update(
        {
            "content_version": digest(name, reference),
            "iteration": k,
            "reference": reference,
            "kind": "photref magfit iteration",
        }
    )
    return name


def frame_chunks(store) -> list[tuple[int, int]]:
    """The frame chunks ``(start, stop)`` of the store: one writer each."""
    group = open_store(store)
    n_frames = committed_sizes(group)[0]
    chunk = group["mag"].chunks[0]
    return [(lo, min(lo + chunk, n_frames)) for lo in range(0, n_frames, chunk)]


def _zeroed_design(terms: FitTerms, columns, measured) -> tuple[np.ndarray, np.ndarray]:
    """The batch's design with its non-computable rows set to 0, and which rows are computable (what
    :func:`fit_photometry` takes to share one design between photometries)."""
    design = frame_design(terms, columns, measured)
    computable = np.isfinite(design).all(axis=2)
    design[~computable] = 0.0
    return design, computable


@functools.lru_cache(maxsize=4)
def _catalog_by_identity(path: str, mtime_ns, size) -> Table:
    return read_catalog(path)


def _read_catalog_once(path) -> Table:
    """The catalog, read once per process while its file is unchanged (every frame-chunk writer needs it;
    reading it costs ~14 ms, a fifth of a 64-frame chunk's fit). Callers only read it."""
    return _catalog_by_identity(*file_key(path))


def _frame_columns(root, names, lo: int, hi: int, n_src: int) -> dict[str, np.ndarray]:
    if not names:
        return {}
    columns = root[SOURCE_COLUMNS_GROUP]
    return {name: columns[name][lo:hi, :n_src] for name in names}


def fit_frame_chunk(
    store,
    iteration_group: str,
    catalog_path,
    params: MagfitParameters,
    frames: tuple[int, int],
    strict: bool = False,
) -> dict:
    """Fit the ingested frames of one frame chunk against the iteration's reference; write their fitted
    magnitudes, errors and ``fitted`` flags into the iteration group (this writer owns the chunk).

    A frame whose fit fails (too few stars, singular terms, a column the terms need missing from it) is
    quarantined for this iteration: all NaN, ``fitted`` False, the reason returned.

    Returns
    -------
    dict
        ``quarantine`` ``{FRAMEID: reason}``, ``fitted`` (count), ``stars_used`` (per frame fitted and
        photometry: stars in the final fit), ``chi_rms``.

    Raises
    ------
    BadInputError
        In strict mode, for the first frame whose fit fails (naming the frame and the reason).
    """
    root = open_store(store)
    group = open_group(store, iteration_group, mode="r+")
    lo, hi = frames
    n_frames, n_src = committed_sizes(root)
    terms = parse_fit_terms(params.magfit_terms)
    catalog = _read_catalog_once(catalog_path)
    source_ids = root["source_id"][:n_src]
    in_catalog = root["in_catalog"][:n_src]
    cat = catalog_columns(catalog, source_ids, in_catalog)
    frame_names = sorted(set(source_column_names(root)) & terms.variables)
    frame_cols = _frame_columns(root, frame_names, lo, hi, n_src)
    # A frame column shadows a catalog column of the same name: it is the measurement of that frame.
    columns = {**cat, **frame_cols}
    reference = group["reference_mag"][:]
    mag = root["mag"][lo:hi, :n_src].astype(np.float64)
    mag_err = root["mag_err"][lo:hi, :n_src].astype(np.float64)
    frame_ids = root["frame_id"][lo:hi]
    ingested = frame_states(root, n_frames)[lo:hi] == INGESTED
    measured = np.isfinite(mag).any(axis=2)
    problems: dict[int, str] = {}
    for name, values in frame_cols.items():
        lacking = ingested & ~(np.isfinite(values) & measured).any(axis=1)
        for b in np.flatnonzero(lacking):
            problems.setdefault(int(b), f"has no values of column {name!r}, which magfit_terms uses")
    fitted = np.full_like(mag, np.nan)
    stars_used = np.zeros((hi - lo, mag.shape[2]), np.int64)
    chi_rms = np.full((hi - lo, mag.shape[2]), np.nan)
    shared = None if "magnitude" in terms.variables else _zeroed_design(terms, columns, measured)
    for p in range(mag.shape[2]):
        design, computable = shared or _zeroed_design(
            terms, {**columns, "magnitude": reference[:, p]}, measured
        )
        eligible = in_catalog & np.isfinite(reference[:, p])
        target = reference[None, :, p] - mag[:, :, p]
        fit = fit_photometry(design, target, mag_err[:, :, p], eligible, params, computable=computable)
        fitted[:, :, p] = mag[:, :, p] + fit.correction
        stars_used[:, p] = fit.n_used
        chi_rms[:, p] = fit.chi_rms
        for b, problem in enumerate(fit.problem):
            if problem is not None and ingested[b]:
                problems.setdefault(b, f"photometry {p}: {problem}")
    ok = ingested.copy()
    for b in problems:
        ok[b] = False
    fitted[~ok] = np.nan
    if strict and problems:
        b = min(problems)
        raise BadInputError(str(frame_ids[b]), f"magnitude fit failed: {problems[b]}")
    errors = np.where(np.isfinite(fitted), mag_err, np.nan)
    dtype = group["mag"].dtype
    group["mag"][lo:hi] = fitted.astype(dtype, copy=False)
    group["mag_err"][lo:hi] = errors.astype(dtype, copy=False)
    group["fitted"][lo:hi] = ok
    return {
        "quarantine": {str(frame_ids[b]): reason for b, reason in sorted(problems.items())},
        "fitted": int(ok.sum()),
        "stars_used": stars_used[ok].tolist(),
        "chi_rms": chi_rms[ok].tolist(),
    }


def finish_iteration(store, iteration_group: str, chunk_results: list[dict]) -> dict:
    """Record the iteration's quarantines in its group; return its summary (frames fitted, quarantined,
    median stars in the fit and chi rms per photometry)."""
    quarantine = {}
    for result in chunk_results:
        quarantine.update(result["quarantine"])
    used = [row for result in chunk_results for row in result["stars_used"]]
    chi = [row for result in chunk_results for row in result["chi_rms"]]
    summary = {
        "frames_fitted": int(sum(result["fitted"] for result in chunk_results)),
        "frames_quarantined": len(quarantine),
        "quarantine": quarantine,
        "median_stars_in_fit": np.median(used, axis=0).tolist() if used else [],
        "median_chi_rms": np.median(chi, axis=0).tolist() if chi else [],
    }
    group = open_group(store, iteration_group, mode="r+")
    group.attrs["quarantine"] = quarantine
    if summary["frames_fitted"] == 0:
        raise BadInputError(
            store_url(store), f"{iteration_group}: no frame could be fitted ({len(quarantine)} quarantined)"
        )
    return summary


def master_change(store, iteration_group: str, current: dict) -> list[float]:
    """Per photometry, the mean squared change of the master magnitudes over the stars in both masters
    (mag^2; NaN when no star is in both): from the master an iteration was fitted against (its
    ``reference_mag``, kept by :func:`create_iteration`) to the master built from it (``current``, as
    :func:`reference_magnitudes`'s master references). Only for iterations fitted against a master."""
    before = open_group(store, iteration_group)["reference_mag"][:]
    after = reference_magnitudes(store, current)
    both = np.isfinite(before) & np.isfinite(after)
    diff2 = np.where(both, (after - before) ** 2, 0.0)
    counts = both.sum(axis=0)
    return [float(d / n) if n else float("nan") for d, n in zip(diff2.sum(axis=0), counts, strict=True)]


def stop_reason(k: int, change: list[float] | None, params: MagfitParameters) -> str | None:
    """Why the loop stops after iteration ``k`` (its master built, ``change`` from the previous master, None
    for the first), or None to go on."""
    refits = k  # iterations 1..k were fitted against a master
    if change is not None and refits >= params.min_master_refits:
        finite = [c for c in change if np.isfinite(c)]
        if finite and max(finite) <= params.max_photref_change:
            return (
                f"converged: master change {max(finite):.3g} mag^2 <= max_photref_change "
                f"{params.max_photref_change:g} after {refits} fits against a master"
            )
    if k + 1 >= params.max_magfit_iterations:
        return f"max_magfit_iterations ({params.max_magfit_iterations}) reached without convergence"
    return None


def finish_run(store, run_group: str, history: list[dict], reason: str, output, products: dict) -> dict:
    """Record the loop's summary in its run group (and the run as the store's latest, removing the groups
    of every other run), write it as JSON beside the master; return it.

    Parameters
    ----------
    history : list of dict
        One entry per iteration: its group, reference, fit summary, master (the file, and the store
        groups of its ``statistics`` and ``fit``) and change.
    reason : str
        Why the loop stopped (:func:`stop_reason`).
    products : dict
        The final master's products (:func:`~photref_core.master.steps.write_products`).
    """
    path = summary_path(output)
    summary = {
        "run_group": run_group,
        # The store's content the loop fitted (its lock held the content fixed): readers of the results
        # (the light curves) refuse a store changed since.
        "store_version": open_store(store).attrs.get("content_version", ""),
        "final_iteration": history[-1]["iteration"],
        "final_group": history[-1]["group"],
        "converged": reason.startswith("converged"),
        "stopped": reason,
        "iterations": history,
        "master": products,
        "summary": str(path),
    }
    atomic_write(path, lambda stream: stream.write(json.dumps(summary, indent=1).encode()))
    root = open_store(store, "r+")
    root.require_group(run_group).attrs["summary"] = summary
    magfit = root.require_group(MAGFIT_GROUP)
    # Each run holds a full copy of the magnitudes per iteration: only the latest run is kept (its final
    # master and JSON summary are on disk; an earlier run's parameters give the same results again).
    for name in list(magfit.group_keys()):
        if f"{MAGFIT_GROUP}/{name}" != run_group:
            del magfit[name]
    magfit.attrs["latest"] = run_group
    return summary


def latest_summary(store) -> dict | None:
    """The summary (:func:`finish_run`) of the store's last finished loop, or None when no loop has
    finished on it."""
    root = open_store(store)
    if MAGFIT_GROUP not in root:
        return None
    run_group = root[MAGFIT_GROUP].attrs.get("latest")
    if run_group is None or run_group not in root:
        return None
    return root[run_group].attrs.get("summary")


def finished_run(store, run_group: str) -> dict | None:
    """The summary of a loop that finished with these inputs (:func:`magfit_run_key`), while its final
    master files are still as it wrote them; None otherwise (never run, killed, or products gone)."""
    from ..master.steps import products_intact

    root = open_store(store)
    if run_group not in root:
        return None
    summary = root[run_group].attrs.get("summary")
    if not summary or not products_intact(summary["master"]):
        return None
    if any(entry["group"] not in root for entry in summary["iterations"]):
        return None
    return summary


def magnitude_fit(
    store,
    catalog_path,
    output,
    params: MagfitParameters | None = None,
    master: MasterParameters | None = None,
    strict: bool = False,
) -> dict:
    """The whole loop on an ingested store, without Prefect (for scripts, notebooks and tests); the flow
    ``magnitude-fitting`` runs the same steps as tasks.

    A loop that finished before with the same inputs is not run again (:func:`finished_run`).

    Returns
    -------
    dict
        The loop's summary (:func:`finish_run`).
    """
    from ..master import steps

    params = params or MagfitParameters()
    master = master or MasterParameters()
    steps.validate_fit_terms(master.fit_terms, catalog_path)
    check_inputs(store, catalog_path, params)
    run_group = magfit_run_key(store, catalog_path, output, params, master, strict)
    done = finished_run(store, run_group)
    if done is not None:
        return done
    reference: dict = {"frame": choose_reference_frame(store, params)}
    history: list[dict] = []
    k = 0
    while True:
        group = create_iteration(store, run_group, k, reference)
        chunks = [
            fit_frame_chunk(store, group, catalog_path, params, frames, strict)
            for frames in frame_chunks(store)
        ]
        entry = {
            "iteration": k,
            "group": group,
            "reference": reference,
            **finish_iteration(store, group, chunks),
        }
        stats = steps.compute_statistics(store, master, data_group=group)
        fit = steps.fit_statistics(store, stats, catalog_path, master)
        products = steps.write_products(
            store, stats, fit, catalog_path, iteration_path(output, k), master, plots=False, data_group=group
        )
        current = {"statistics": stats, "fit": fit}
        change = master_change(store, group, current) if k > 0 else None
        entry.update(master=products["master"], statistics=stats, fit=fit, change=change)
        history.append(entry)
        reason = stop_reason(k, change, params)
        if reason is not None:
            break
        reference, k = current, k + 1
    final = steps.write_products(store, stats, fit, catalog_path, output, master, data_group=group)
    return finish_run(store, run_group, history, reason, output, final)
