"""What runs are called in the Prefect UI: the field, and the parameters that differ from the defaults.

A run list that says ``master field.zarr thr=4`` beside ``master field.zarr`` tells at a glance which run
changed what; a bare hash or Prefect's ``create-flux-arrays-30e`` tells nothing. Everything here is pure
string work over a run's parameters, shared by the flow and task run names and the artifact keys. The
run-name functions (``*_run_name``) are given to ``flow_run_name`` / ``task_run_name``: Prefect calls
them when the run starts, and they read its parameters from :mod:`prefect.runtime`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping

import numpy as np

from photref_core.master.parameters import MASTER_DEFAULTS
from photref_core.prf.parameters import PRF_DEFAULTS

__all__ = [
    "MASTER_SHORT_NAMES",
    "PRF_SHORT_NAMES",
    "artifact_key",
    "batch_task_name",
    "changed_parameters",
    "field_name",
    "field_slug",
    "field_task_name",
    "format_value",
    "flow_run_name",
    "frame_range",
    "join_name",
    "master_changes",
    "prf_changes",
    "write_task_name",
]

#: Short names of the master parameters in run names, in the order shown (the others by their own name).
MASTER_SHORT_NAMES = {
    "fit_outlier_threshold": "thr",
    "fit_terms": "terms",
    "fit_outlier_average": "fit_avg",
    "fit_max_rej_iter": "fit_iter",
    "scatter_quantity": "scatter",
    "outlier_threshold": "rej",
    "rejection_units": "units",
    "rejection_center": "center",
    "max_rejection_iterations": "rej_iter",
    "min_nobs_median_fraction": "min_nobs",
}

#: Short names of the PRF parameters in run names (the others by their own name).
PRF_SHORT_NAMES = {
    "rmin": "rmin",
    "rmax": "rmax",
    "n_r_knots": "r_knots",
    "n_phi_knots": "phi_knots",
    "cut_r": "cut_r",
    "sparse_dist_lim": "sparse",
    "sources_flux_column": "flux_col",
    "frame_index": "ref",
    "bin_data": "bin",
    "fit_background": "bkg",
    "time_model": "time",
}


def field_name(store) -> str:
    """The field as a user names it: the last component of the store's path or URL (``field.zarr``)."""
    text = os.fspath(store).rstrip("/")
    return text.rsplit("/", 1)[-1] or text


def field_slug(store) -> str:
    """A key-safe name of the field, unique per store: ``field-zarr-3f9a1c``.

    Prefect artifact keys allow lower-case letters, digits and dashes only; the short hash of the whole
    store path keeps two fields both called ``field.zarr`` (in different directories) apart.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", field_name(store).lower()).strip("-")[:40] or "store"
    return f"{slug}-{hashlib.sha1(os.fspath(store).encode()).hexdigest()[:6]}"


def artifact_key(kind: str, store) -> str:
    """The key of an artifact of ``kind`` (``master-summary``) for the field ``store``: ``<kind>-<slug>``."""
    return f"{kind}-{field_slug(store)}"


def format_value(value) -> str:
    """A parameter value as a run name shows it: ``4`` for 4.0, ``0.25``, ``O2{g}``, ``none``, ``[40]``."""
    if value is None:
        return "none"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    if isinstance(value, list | tuple | np.ndarray):
        return f"[{len(value)}]"  # a per-frame mask or a per-source prior: its length, not its values
    return str(value)


def _same(value, default) -> bool:
    if isinstance(value, list | tuple | np.ndarray) or isinstance(default, list | tuple | np.ndarray):
        return False  # a per-source prior or a mask is never the scalar default
    try:
        return bool(value == default)
    except (TypeError, ValueError):
        return False


def changed_parameters(values: Mapping, defaults: Mapping, short_names: Mapping[str, str]) -> str:
    """``thr=4 units=stddev``: the parameters whose value differs from its default.

    Parameters
    ----------
    values : mapping
        A run's parameters by their full name (missing ones count as the default).
    defaults : mapping
        Every parameter's default, by full name.
    short_names : mapping
        Full name -> the short name shown; these come first, in this order, then the others by name.

    Returns
    -------
    str
        Space-separated ``short=value`` items; empty when every parameter has its default.
    """
    order = [*short_names, *(name for name in defaults if name not in short_names)]
    items = []
    for name in order:
        if name in values and name in defaults and not _same(values[name], defaults[name]):
            items.append(f"{short_names.get(name, name)}={format_value(values[name])}")
    return " ".join(items)


def _as_mapping(params) -> Mapping:
    """A parameters object's values by name: a pydantic model, a dataclass, or already a mapping."""
    if params is None:
        return {}
    if hasattr(params, "model_dump"):
        return params.model_dump()
    if dataclasses.is_dataclass(params):
        return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    return dict(params)


def master_changes(params) -> str:
    """The master parameters that differ from the defaults (:func:`changed_parameters`)."""
    return changed_parameters(_as_mapping(params), MASTER_DEFAULTS, MASTER_SHORT_NAMES)


def prf_changes(params) -> str:
    """The PRF parameters that differ from the defaults (:func:`changed_parameters`)."""
    return changed_parameters(_as_mapping(params), PRF_DEFAULTS, PRF_SHORT_NAMES)


def frame_range(slots) -> str:
    """``8-15`` for the slots 8..15, ``8`` for one slot, ``8-15 (5 frames)`` when some are missing."""
    slots = sorted(int(s) for s in slots)
    if not slots:
        return "none"
    if len(slots) == 1:
        return str(slots[0])
    text = f"{slots[0]}-{slots[-1]}"
    if slots[-1] - slots[0] + 1 != len(slots):
        text += f" ({len(slots)} frames)"
    return text


def field_task_name(what: str):
    """A ``task_run_name`` function: ``<what> <field>`` from the task's ``store`` parameter."""

    def name(parameters) -> str:
        return f"{what} {field_name(parameters['store'])}"

    return name


def write_task_name(parameters) -> str:
    """A ``task_run_name`` function: ``write <file name>`` from the task's ``output`` parameter."""
    return f"write {os.path.basename(parameters['output'])}"


def batch_task_name(what: str):
    """A ``task_run_name`` function for a writer batch: ``<what> 8-15 (chunk 1)`` from its ``batch``."""

    def name(parameters) -> str:
        batch = parameters["batch"]
        return f"{what} {frame_range(batch.slots)} (chunk {batch.chunk})"

    return name


def flow_run_name(what: str, changes=None):
    """A ``flow_run_name`` function: ``<what> <field> <changes>``, e.g. ``master field.zarr thr=4``.

    ``changes``: a function of the run's parameters (a dict) giving the parameters that differ from the
    defaults (:func:`master_changes`, :func:`prf_changes`); Prefect calls the returned function with no
    argument when the run starts, and the parameters come from :mod:`prefect.runtime`.
    """

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        return join_name(
            what, field_name(parameters.get("store", "?")), changes(parameters) if changes else ""
        )

    return name


def join_name(*parts) -> str:
    """Non-empty parts joined by spaces: ``master field.zarr`` + ``thr=4``."""
    return " ".join(str(p) for p in parts if p not in (None, ""))
