"""The parameters of magnitude fitting (SPEC 9): one typed object, the only place their defaults live.

:class:`MagfitParameters` follows :class:`~photref_core.master.parameters.MasterParameters`: a frozen
pydantic model that the flow takes as one parameter (a form in the UI), from which the ``photref magfit``
options are built, and whose defaults are written here once. The master built inside the loop takes its own
:class:`~photref_core.master.parameters.MasterParameters` beside it; the field names of the two never clash
(the per-frame fit's are prefixed ``magfit_``), so one command line carries both.

Decisions where AutoWISP's loop and SPEC 9 leave room (measured on simulated raw frames, see the README):

* **Weights**: inverse variance, ``1 / (mag_err^2 + noise_offset^2)`` (the offset added in quadrature: an
  error floor for the bright stars). AutoWISP scales the rows by ``1 / (mag_err + noise_offset)``, i.e.
  weights ``1 / (mag_err + noise_offset)^2``; ``magfit_weighting='autowisp'`` gives that, ``'none'`` an
  unweighted fit (it fails the variables: the faint stars' noise drives the correction).
* **Rejection** compares each residual with its own error (``|r| / sqrt(mag_err^2 + noise_offset^2)``)
  against ``magfit_rejection_level`` times the root mean square of those normalised residuals over the
  stars still in the fit; rejected stars leave the fit for good. AutoWISP compares raw residuals with a
  spread dominated by the bright stars, which cuts faint stars at ~2 sigma (2.7 % rejected for 1 % real
  outliers) and needs twice the refits for the same answer.
* **Stopping**: the loop stops when the master changed by at most ``max_photref_change`` (SPEC 9's mean
  squared change, 1e-4 mag^2) *and* at least ``min_master_refits`` fits against a master were made. With
  SPEC's rule alone the change after the first refit is ~1e-7 mag^2 and the loop always stopped after two
  passes, even from a poor reference frame whose master still damped the variables.
* **Few stars**: a frame whose fit has fewer than ``min_stars_per_term`` x (number of terms) usable stars is
  quarantined for that iteration (at 25 stars for 20 terms the correction was 150 mmag off; at 40 it
  absorbed the stars' own noise).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..master.fitterms import valid_expression

__all__ = ["MAGFIT_DEFAULTS", "MagfitParameters", "MagfitWeighting"]

MagfitWeighting = Literal["inverse_variance", "autowisp", "none"]


class MagfitParameters(BaseModel):
    """Every parameter of the magnitude-fitting loop (SPEC 9) except the master's own.

    Attributes
    ----------
    magfit_terms : str
        Fit-terms expression (SPEC 4) of the per-frame correction, over catalog columns, the frames'
        per-source columns (``x``, ``y``, ...) and ``magnitude`` (the reference magnitude).
    max_magfit_iterations : int
        Most fitting passes (the first against the reference frame, the others against the master).
    max_photref_change : float
        Convergence: the largest over photometries of the mean squared change of the master magnitudes
        (stars in both masters), in mag^2.
    min_master_refits : int
        Fits against a master before the loop may stop on convergence.
    reference_frame : str or None
        FRAMEID of the first pass's reference; default: the frame with the most good measurements.
    magfit_rejection_level, magfit_max_rejection_iterations
        Per-frame outlier rejection: threshold in normalised residuals, most refits.
    max_mag_err : float
        Measurements with a larger error are left out of the fit (they are still corrected).
    noise_offset : float
        Error floor added in quadrature to every error (mag).
    magfit_weighting : {'inverse_variance', 'autowisp', 'none'}
        The fit's weights.
    min_stars_per_term : float
        A frame's fit needs at least this many usable stars per term.

    Raises
    ------
    pydantic.ValidationError
        (a ``ValueError``) for a value out of range or a bad fit-terms expression, naming the field.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="Magnitude-fitting parameters",
        json_schema_extra={
            "description": "SPEC 9: per-frame fit against a reference, iterated with the master."
        },
    )

    magfit_terms: str = Field(
        "O3{phot_g_mean_mag, x, y}",
        min_length=1,
        description="Fit-terms expression of the per-frame correction (catalog and frame columns).",
    )
    max_magfit_iterations: int = Field(
        5, ge=1, description="Most fitting passes (reference frame, then masters)."
    )
    max_photref_change: float = Field(
        1e-4,
        ge=0,
        allow_inf_nan=False,
        description="Converged when the master's mean squared change (mag^2) is at most this.",
    )
    min_master_refits: int = Field(
        2, ge=0, description="Fits against a master before the loop may stop on convergence."
    )
    reference_frame: str | None = Field(
        None, description="FRAMEID of the first reference (default: the frame with the most good stars)."
    )
    magfit_rejection_level: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="Per-frame rejection threshold, in normalised residuals."
    )
    magfit_max_rejection_iterations: int = Field(
        20, ge=0, description="Per-frame fit: most rejection refits."
    )
    max_mag_err: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="Measurements with a larger mag_err stay out of the fit."
    )
    noise_offset: float = Field(
        0.01, ge=0, allow_inf_nan=False, description="Error floor added in quadrature to mag_err (mag)."
    )
    magfit_weighting: MagfitWeighting = Field(
        "inverse_variance", description="Weights: 1/(err^2+offset^2), AutoWISP's 1/(err+offset)^2, or none."
    )
    min_stars_per_term: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="A frame's fit needs this many usable stars per term."
    )

    @field_validator("magfit_terms")
    @classmethod
    def _parse_magfit_terms(cls, value: str) -> str:
        return valid_expression(value)

    def min_stars(self, n_terms: int) -> int:
        """The fewest usable stars a fit of ``n_terms`` terms needs: ``min_stars_per_term`` x terms."""
        return int(np.ceil(self.min_stars_per_term * n_terms))

    def as_dict(self) -> dict:
        """Plain dictionary of the parameters, in field order."""
        return self.model_dump()


#: Every magnitude-fitting parameter's default, by name.
MAGFIT_DEFAULTS = {name: info.default for name, info in MagfitParameters.model_fields.items()}
