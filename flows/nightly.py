"""Flow: the nightly master -- ingest the frames that arrived, then rebuild the master photometric reference.

DAG::

    nightly-master
        -> master-photref (subflow, frames=[frames_glob])
              -> ingest-frames (subflow: only new or changed frames are read)
              -> statistics -> scatter-fit -> master-products -> summary artifacts
        -> nightly summary artifact

The flow is deliberately thin: it validates its parameters (:class:`NightlySettings`), picks the task
runner (local threads or an existing Dask scheduler) and calls
:func:`flows.master_photref.build_master_photref`. All the science, the caching and the artifacts live
there; a night without new frames is a cache hit.

Parameters arrive from a deployment, the Prefect UI or the API, so they are untrusted: every field of
:class:`NightlySettings` is typed (``Literal`` choices, positive thresholds) and the fit-terms expression
is parsed by the project's own whitelisting parser before any work starts. A bad value is refused with a
message that names the field: by the Prefect server when a run is created (everything the JSON schema of
the parameters can express) and by the flow engine when the run starts (the fit-terms grammar).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run
from pydantic import ConfigDict, Field, field_validator

from flows.artifacts import publish_nightly_summary
from flows.master_photref import build_master_photref
from flows.runners import make_task_runner
from photref_core.master.outofcore import DEFAULT_BLOCK_MIB
from photref_core.master.parameters import MasterParameters
from tasks.naming import field_name

__all__ = ["NightlySettings", "nightly_master"]

NonEmptyPath = Annotated[str, Field(min_length=1)]


class NightlySettings(MasterParameters):
    """Everything one nightly run needs: where the field lives, and the SPEC 3-5 parameters.

    Attributes
    ----------
    store : str
        The field's zarr store (directory or fsspec URL); created by the first run.
    catalog : str
        Catalog file (SPEC 1.2): the variables of the fit terms.
    frames_glob : str
        Glob of the frame photometry files (e.g. ``/data/field/frames/*.fits``); frames already in the
        store with unchanged files are skipped.
    output : str
        Master FITS path; the statistics table and the plots are written beside it.
    strict : bool
        Fail the run on a bad frame instead of quarantining it.
    fit_terms, min_nobs_median_fraction, fit_outlier_*, outlier_threshold, rejection_* ...
        The SPEC 3-5 parameters: the fields of :class:`~photref_core.master.parameters.MasterParameters`
        (inherited, so their defaults, bounds and descriptions are that object's). ``fit_terms`` is parsed
        (never executed) when the settings are built.
    extra_header : dict, optional
        Keywords for the master's primary header.
    block_mib : float
        Memory budget of one out-of-core source block, in MiB.
    plots : bool
        Write the PNG plots (and show them in the summary artifact).
    lock_timeout : float or None
        Seconds to wait for another run on the same store to finish (``None``: wait as long as it takes).
    """

    model_config = ConfigDict(
        extra="forbid",
        title="Nightly master settings",
        # The UI shows this instead of the whole docstring.
        json_schema_extra={"description": "The field's paths and the SPEC 3-5 parameters of the master."},
    )

    store: NonEmptyPath = Field(description="The field's zarr store (directory or fsspec URL).")
    catalog: NonEmptyPath = Field(description="Catalog file (source_id + Gaia-like columns).")
    frames_glob: NonEmptyPath = Field(
        description="Glob of the frame photometry files, e.g. /data/field/frames/*.fits."
    )
    output: NonEmptyPath = Field(
        description="Master FITS path (the statistics table and the plots go beside it)."
    )
    strict: bool = Field(False, description="Fail the run on a bad frame instead of quarantining it.")
    extra_header: dict[str, str | int | float | bool] | None = Field(
        None, description="Keywords for the master's primary header."
    )
    block_mib: float = Field(
        DEFAULT_BLOCK_MIB, gt=0, description="Memory budget of one out-of-core source block, in MiB."
    )
    plots: bool = Field(True, description="Write the PNG plots.")
    lock_timeout: float | None = Field(
        1800.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds to wait for another run on the same store (empty: wait as long as it takes).",
    )

    @field_validator("extra_header")
    @classmethod
    def _finite_header_values(cls, value: dict | None) -> dict | None:
        for key, item in (value or {}).items():
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"header keyword {key!r} has a non-finite value {item!r}")
        return value

    def master_parameters(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~flows.master_photref.build_master_photref` for these settings.

        Returns
        -------
        dict
            ``store``, ``catalog``, ``output``, ``frames`` (the glob, as a one-element list), ``params``
            (the SPEC 3-5 parameters) and every product and run option.
        """
        master_fields = set(MasterParameters.model_fields)
        kwargs = self.model_dump(exclude={"frames_glob"} | master_fields)
        kwargs["frames"] = [self.frames_glob]
        kwargs["params"] = MasterParameters(**self.model_dump(include=master_fields))
        return kwargs


def _run_name() -> str:
    """``nightly <date> <field>``: the scheduled date (UTC) and the field's store."""
    settings = runtime_flow_run.parameters.get("settings")
    store = getattr(settings, "store", None) or (settings or {}).get("store", "?")
    when = runtime_flow_run.scheduled_start_time
    date = when.strftime("%Y-%m-%d") if when is not None else "now"
    return f"nightly {date} {field_name(store)}"


@flow(name="nightly-master", flow_run_name=_run_name, validate_parameters=True)
def nightly_master(
    settings: NightlySettings,
    dask_address: str | None = None,
    max_workers: Annotated[int, Field(gt=0)] | None = None,
) -> dict:
    """Ingest the new frames of a field and rebuild its master photometric reference.

    Parameters
    ----------
    settings : NightlySettings
        The field (store, catalog, frames glob, master path) and the SPEC 3-5 parameters.
    dask_address : str, optional
        Run the tasks (the ingestion fan-out and the master's steps) on this existing Dask
        ``distributed`` scheduler (``tcp://host:8786``) instead of local threads.
    max_workers : int, optional
        Threads of the local task runner (default: the number of cores, at most 4); ignored with
        ``dask_address``.

    Returns
    -------
    dict
        What :func:`~flows.master_photref.build_master_photref` returns: the product paths and a
        per-photometry summary.
    """
    logger = get_run_logger()
    logger.info("nightly master of %s from %s", settings.store, settings.frames_glob)
    master = build_master_photref.with_options(task_runner=make_task_runner(max_workers, dask_address))
    products = master(**settings.master_parameters())
    publish_nightly_summary(settings, products)
    return products
