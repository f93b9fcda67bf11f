"""The parameters of the master chain (SPEC 3-5): defaults and FITS keywords, in one place.

The CLI, the flow signatures and the nightly deployment's settings take their defaults from
:class:`MasterParameters` (``MASTER_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from .. import SOFTWARE
from .fitterms import DEFAULT_FIT_TERMS, parse_fit_terms
from .scatter import ScatterFitParameters
from .stats import RejectionParameters

__all__ = [
    "MASTER_DEFAULTS",
    "MasterParameters",
    "master_header",
]


@dataclass(frozen=True)
class MasterParameters:
    """Every parameter of SPEC 3-5, with the SPEC defaults (names as AutoWISP's)."""

    outlier_threshold: float = 5.0
    max_rejection_iterations: int = 10
    rejection_center: str = "median"
    rejection_units: str = "meddev"
    min_nobs_median_fraction: float = 0.5
    fit_terms: str = DEFAULT_FIT_TERMS
    fit_outlier_threshold: float = 3.0
    fit_outlier_average: str = "median"
    fit_max_rej_iter: int = 20
    scatter_quantity: str = "medianmeddev"

    def __post_init__(self):
        # Fail on bad values at construction, before any work starts.
        self.rejection()
        self.scatter()
        parse_fit_terms(self.fit_terms)
        fraction = self.min_nobs_median_fraction
        if not (isinstance(fraction, int | float) and 0 <= fraction and np.isfinite(fraction)):
            raise ValueError(f"min_nobs_median_fraction must be a finite number >= 0, got {fraction!r}")

    def rejection(self) -> RejectionParameters:
        """The statistics' parameters."""
        return RejectionParameters(
            outlier_threshold=self.outlier_threshold,
            max_rejection_iterations=self.max_rejection_iterations,
            rejection_center=self.rejection_center,
            rejection_units=self.rejection_units,
        )

    def scatter(self) -> ScatterFitParameters:
        """The scatter fit's parameters."""
        return ScatterFitParameters(
            fit_outlier_threshold=self.fit_outlier_threshold,
            fit_outlier_average=self.fit_outlier_average,
            fit_max_rej_iter=self.fit_max_rej_iter,
            scatter_quantity=self.scatter_quantity,
        )

    def as_dict(self) -> dict:
        """Plain dictionary of the parameters."""
        return dataclasses.asdict(self)

    STATISTICS_FIELDS = (
        "outlier_threshold",
        "max_rejection_iterations",
        "rejection_center",
        "rejection_units",
    )


def master_header(store, params: MasterParameters, n_frames: int) -> dict:
    """The master's primary header keywords (SPEC 5)."""
    return {
        "FITTERMS": params.fit_terms,
        "MINOBSFR": params.min_nobs_median_fraction,
        "OUTL_AVG": params.fit_outlier_average,
        "OUTL_THR": params.fit_outlier_threshold,
        "MAXREJIT": params.fit_max_rej_iter,
        "STATTHR": params.outlier_threshold,
        "STATITER": params.max_rejection_iterations,
        "STATCEN": params.rejection_center,
        "STATUNIT": params.rejection_units,
        "SCATQTY": params.scatter_quantity,
        "NFRAMES": n_frames,
        "SOFTWARE": SOFTWARE,
        "STORE": os.fspath(store) if "://" in os.fspath(store) else os.path.abspath(store),
    }


#: Every master parameter's default, by name (what the CLI, the flows and the deployments show).
MASTER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MasterParameters)}
