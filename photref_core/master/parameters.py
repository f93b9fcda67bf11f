"""The parameters of the master chain (SPEC 3-5): one typed object, the only place their defaults live.

:class:`MasterParameters` is a frozen pydantic model, so that the one object serves every face:

* the flows take it as one parameter (``params``), and Prefect renders it as a form in the UI, with each
  field's description, choices and bounds; a deployment's server refuses what the bounds exclude;
* the ``photref master`` options are built from its fields (:func:`flows.cli`), help and default included;
* the nightly deployment's settings (:class:`flows.nightly.NightlySettings`) extend it;
* the master's primary-header keywords come from each field's :class:`FitsKeyword`.

The defaults of the statistics and of the scatter fit are those of :class:`~.stats.RejectionParameters` and
:class:`~.scatter.ScatterFitParameters` (the objects their kernels take): written once, there.
Adding a parameter: a field here (its default, bounds, description and FITS keyword), the step that uses
it, and a test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import SOFTWARE
from .fitterms import DEFAULT_FIT_TERMS, valid_expression
from .scatter import OutlierAverage, ScatterFitParameters, ScatterQuantity
from .stats import RejectionCenter, RejectionParameters, RejectionUnits

__all__ = [
    "MASTER_DEFAULTS",
    "FitsKeyword",
    "MasterParameters",
    "master_header",
]

_REJECTION = RejectionParameters()
_SCATTER = ScatterFitParameters()


@dataclass(frozen=True)
class FitsKeyword:
    """Where a parameter is recorded in the master's primary header: the keyword and its comment."""

    keyword: str
    comment: str


class MasterParameters(BaseModel):
    """Every parameter of SPEC 3-5 (names as AutoWISP's), with the SPEC defaults.

    Attributes
    ----------
    fit_terms : str
        Fit-terms expression over catalog columns (parsed, never executed, when the object is built).
    min_nobs_median_fraction : float
        A star has enough points when its kept count exceeds this fraction of the median kept count.
    fit_outlier_average, fit_outlier_threshold, fit_max_rej_iter, scatter_quantity
        The scatter fit and the master selection (:class:`~.scatter.ScatterFitParameters`).
    outlier_threshold, max_rejection_iterations, rejection_center, rejection_units
        The statistics with iterative rejection (:class:`~.stats.RejectionParameters`).

    Raises
    ------
    pydantic.ValidationError
        (a ``ValueError``) for a value out of range or a bad fit-terms expression, naming the field.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="Master parameters",
        json_schema_extra={"description": "SPEC 3-5: statistics with rejection, scatter fit, master cut."},
    )

    # The field order is the order of the master's header keywords (SPEC 5), of the CLI options and of
    # the UI form.
    fit_terms: Annotated[str, FitsKeyword("FITTERMS", "fit-terms expression of the scatter fit")] = Field(
        DEFAULT_FIT_TERMS,
        min_length=1,
        description="Fit-terms expression over catalog columns, e.g. O2{phot_g_mean_mag}.",
    )
    min_nobs_median_fraction: Annotated[float, FitsKeyword("MINOBSFR", "min_nobs_median_fraction")] = Field(
        0.5,
        ge=0,
        allow_inf_nan=False,
        description="A star has enough points when its kept count exceeds this fraction of the median.",
    )
    fit_outlier_average: Annotated[
        OutlierAverage, FitsKeyword("OUTL_AVG", "fit_outlier_average (median or mean)")
    ] = Field(_SCATTER.fit_outlier_average, description="Scatter fit: average of the squared residuals.")
    fit_outlier_threshold: Annotated[float, FitsKeyword("OUTL_THR", "fit_outlier_threshold")] = Field(
        _SCATTER.fit_outlier_threshold,
        gt=0,
        allow_inf_nan=False,
        description="Scatter fit: outlier threshold (and the master cut), in averaged residuals.",
    )
    fit_max_rej_iter: Annotated[int, FitsKeyword("MAXREJIT", "fit_max_rej_iter")] = Field(
        _SCATTER.fit_max_rej_iter, ge=0, description="Scatter fit: most rejection iterations."
    )
    outlier_threshold: Annotated[float, FitsKeyword("STATTHR", "statistics outlier_threshold")] = Field(
        _REJECTION.outlier_threshold,
        gt=0,
        allow_inf_nan=False,
        description="Statistics: rejection threshold T, in units of rejection_units.",
    )
    max_rejection_iterations: Annotated[
        int, FitsKeyword("STATITER", "statistics max_rejection_iterations")
    ] = Field(_REJECTION.max_rejection_iterations, ge=0, description="Statistics: most rejection iterations.")
    rejection_center: Annotated[RejectionCenter, FitsKeyword("STATCEN", "statistics rejection_center")] = (
        Field(_REJECTION.rejection_center, description="Statistics: the centre of the kept values.")
    )
    rejection_units: Annotated[RejectionUnits, FitsKeyword("STATUNIT", "statistics rejection_units")] = Field(
        _REJECTION.rejection_units, description="Statistics: the unit of the threshold."
    )
    scatter_quantity: Annotated[
        ScatterQuantity, FitsKeyword("SCATQTY", "scatter_quantity fitted (log10)")
    ] = Field(_SCATTER.scatter_quantity, description="Scatter fit: the scatter statistic fitted.")

    #: The fields the statistics depend on (the statistics' cache key).
    STATISTICS_FIELDS: ClassVar[tuple[str, ...]] = (
        "outlier_threshold",
        "max_rejection_iterations",
        "rejection_center",
        "rejection_units",
    )

    @field_validator("fit_terms")
    @classmethod
    def _parse_fit_terms(cls, value: str) -> str:
        return valid_expression(value)

    @model_validator(mode="after")
    def _parts_accept(self):
        # The kernels' own checks too (bool thresholds, say), so that what is accepted here runs.
        self.rejection()
        self.scatter()
        return self

    def rejection(self) -> RejectionParameters:
        """The statistics' parameters."""
        return RejectionParameters(**{name: getattr(self, name) for name in self.STATISTICS_FIELDS})

    def scatter(self) -> ScatterFitParameters:
        """The scatter fit's parameters."""
        return ScatterFitParameters(
            fit_outlier_threshold=self.fit_outlier_threshold,
            fit_outlier_average=self.fit_outlier_average,
            fit_max_rej_iter=self.fit_max_rej_iter,
            scatter_quantity=self.scatter_quantity,
        )

    def as_dict(self) -> dict:
        """Plain dictionary of the parameters, in field order."""
        return self.model_dump()

    @classmethod
    def fits_keywords(cls) -> dict[str, tuple[str, str]]:
        """``{keyword: (field name, comment)}`` of the header keywords, in field order."""
        out = {}
        for name, info in cls.model_fields.items():
            for item in info.metadata:
                if isinstance(item, FitsKeyword):
                    out[item.keyword] = (name, item.comment)
        return out


def master_header(store, params: MasterParameters, n_frames: int) -> dict:
    """The master's primary header keywords (SPEC 5): every parameter's, then the run's."""
    header = {keyword: getattr(params, name) for keyword, (name, _) in params.fits_keywords().items()}
    header.update(
        NFRAMES=n_frames,
        SOFTWARE=SOFTWARE,
        STORE=os.fspath(store) if "://" in os.fspath(store) else os.path.abspath(store),
    )
    return header


#: Every master parameter's default, by name.
MASTER_DEFAULTS = {name: info.default for name, info in MasterParameters.model_fields.items()}
