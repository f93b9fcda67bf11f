"""Fit of the scatter of stars against their properties, and the master selection (SPEC section 5).

For one photometry: ``y = log10(scatter)`` is fitted with ordinary least squares against the predictors
``X`` (the evaluated fit-terms expression, :mod:`photref_core.fitterms`) with iterative rejection of
outliers; the *scatter excess* ``y - X.coef`` (in dex) then decides which stars are quiet enough to
enter the master photometric reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from ..checks import check_choice, check_count, check_positive_finite
from ..errors import FitError

__all__ = ["ScatterFitParameters", "ScatterFitResult", "fit_scatter"]

OutlierAverage = Literal["median", "mean"]
ScatterQuantity = Literal["medianmeddev", "mediandev"]
_AVERAGES = {"median": np.median, "mean": np.mean}
SCATTER_QUANTITIES = get_args(ScatterQuantity)


@dataclass(frozen=True)
class ScatterFitParameters:
    """Settings of the scatter fit and of the master selection.

    Parameters
    ----------
    fit_outlier_threshold : float
        Rejection threshold, in units of the averaged residual: a star leaves the fit when
        ``r**2 > fit_outlier_threshold**2 * avg(r**2)``, and enters the master only when its scatter
        excess is at most ``fit_outlier_threshold * avg(|excess|)``. Default 3.0, AutoWISP's default
        (``fit_outlier_threshold=3.0`` in ``MasterPhotrefCollector.generate_master``,
        ``autowisp/magnitude_fitting/master_photref_collector_zarr.py``).
    fit_outlier_average : {'median', 'mean'}
        How residuals are averaged for the two rules above (AutoWISP default ``'median'``).
    fit_max_rej_iter : int
        Most rejection iterations: at most ``1 + fit_max_rej_iter`` fits (AutoWISP default 20).
    scatter_quantity : {'medianmeddev', 'mediandev'}
        Which statistic is the scatter being fitted. Not used by :func:`fit_scatter` itself (the
        caller passes the chosen column); kept here so that one object describes the whole step.

    Raises
    ------
    ValueError
        For an unknown average or scatter quantity, a threshold that is not a positive finite number,
        or a negative iteration limit.
    """

    fit_outlier_threshold: float = 3.0
    fit_outlier_average: OutlierAverage = "median"
    fit_max_rej_iter: int = 20
    scatter_quantity: ScatterQuantity = "medianmeddev"

    def __post_init__(self):
        check_positive_finite("fit_outlier_threshold", self.fit_outlier_threshold)
        check_choice("fit_outlier_average", self.fit_outlier_average, _AVERAGES)
        check_count("fit_max_rej_iter", self.fit_max_rej_iter)
        check_choice("scatter_quantity", self.scatter_quantity, SCATTER_QUANTITIES)


@dataclass
class ScatterFitResult:
    """Outcome of :func:`fit_scatter` for one photometry.

    Attributes
    ----------
    coefficients : numpy.ndarray
        ``(nterms,)`` coefficients of the last fit (log10 scatter per unit predictor).
    scatter_excess : numpy.ndarray
        ``(nstars,)`` ``y - X.coef`` in dex; NaN where ``y`` or a predictor is not finite.
    in_fit : numpy.ndarray
        ``(nstars,)`` bool: the star took part in the last fit.
    usable : numpy.ndarray
        ``(nstars,)`` bool: finite ``y``, finite predictors and ``enough`` counts.
    n_fits : int
        Number of least-squares fits done (1 to ``1 + fit_max_rej_iter``).
    rms : float
        Root mean square of the residuals of the stars in the last fit.
    in_master : numpy.ndarray
        ``(nstars,)`` bool: ``enough`` and ``scatter_excess <= threshold * avg(|scatter_excess|)``.
    """

    coefficients: np.ndarray
    scatter_excess: np.ndarray
    in_fit: np.ndarray
    usable: np.ndarray
    n_fits: int
    rms: float
    in_master: np.ndarray


def fit_scatter(
    scatter: np.ndarray,
    X: np.ndarray,
    enough: np.ndarray,
    params: ScatterFitParameters | None = None,
    photometry: int = 0,
) -> ScatterFitResult:
    """Fit log10 of the scatter against the predictors with iterative rejection, and pick the master.

    Parameters
    ----------
    scatter : array_like
        ``(nstars,)`` scatter of each star (its ``medianmeddev`` or ``mediandev``, in magnitudes).
        Stars with zero, negative or non-finite scatter have no finite ``y``: never fitted, NaN
        excess, never in the master.
    X : array_like
        ``(nstars, nterms)`` predictors (:meth:`photref_core.fitterms.FitTerms.evaluate`).
    enough : array_like
        ``(nstars,)`` bool: the star has enough kept measurements (SPEC 3).
    params : ScatterFitParameters, optional
        Defaults to ``ScatterFitParameters()``.
    photometry : int
        Index of the photometry being fitted; only used in error messages.

    Returns
    -------
    ScatterFitResult

    Raises
    ------
    FitError
        When, before any fit (the first or a refit after rejection), fewer stars remain than there are
        terms; the message names the photometry and both counts.
    ValueError
        When the shapes of the inputs do not agree.

    Notes
    -----
    Exactly SPEC 5: ``y = log10(scatter)``; usable = finite ``y``, finite predictors, ``enough``.
    Ordinary least squares (:func:`numpy.linalg.lstsq`, minimum-norm solution if ``X`` is rank
    deficient) on the stars still in the fit; ``r = X.coef - y``; ``res2 = avg(r**2)`` over those
    stars; stars with ``r**2 > threshold**2 * res2`` leave for good; refit until none leaves or
    ``1 + fit_max_rej_iter`` fits are done. The coefficients are those of the last fit and
    ``in_fit`` the stars it used (rejections found after the last allowed fit are not applied).
    The master rule is one-sided and averages ``|excess|`` over every star with a finite excess,
    including stars without enough counts and stars the fit rejected.
    """
    if params is None:
        params = ScatterFitParameters()
    scatter = np.asarray(scatter, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    enough = np.asarray(enough, dtype=bool)
    if scatter.ndim != 1:
        raise ValueError(f"scatter must be one-dimensional, got shape {scatter.shape}")
    nstars = scatter.shape[0]
    if X.ndim != 2 or X.shape[0] != nstars:
        raise ValueError(f"X must have shape ({nstars}, nterms), got {X.shape}")
    if enough.shape != (nstars,):
        raise ValueError(f"enough must have shape ({nstars},), got {enough.shape}")
    nterms = X.shape[1]
    if nterms == 0:
        raise FitError(f"scatter fit of photometry {photometry}: no fit terms")

    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log10(scatter)
    computable = np.isfinite(y) & np.isfinite(X).all(axis=1)
    usable = computable & enough

    average = _AVERAGES[params.fit_outlier_average]
    threshold2 = params.fit_outlier_threshold**2
    max_fits = 1 + int(params.fit_max_rej_iter)

    fit_index = np.flatnonzero(usable)  # stars still in the fit
    n_fits = 0
    while True:
        if fit_index.size < nterms:
            raise FitError(
                f"scatter fit of photometry {photometry}: {fit_index.size} stars left to fit {nterms} "
                f"terms (fit {n_fits + 1}; {int(usable.sum())} usable of {nstars} stars)"
            )
        Xf = X[fit_index]
        yf = y[fit_index]
        coefficients = np.linalg.lstsq(Xf, yf, rcond=None)[0]
        n_fits += 1
        r2 = np.square(Xf @ coefficients - yf)
        res2 = average(r2)
        leaving = r2 > threshold2 * res2
        if not leaving.any() or n_fits >= max_fits:
            break
        fit_index = fit_index[~leaving]

    in_fit = np.zeros(nstars, dtype=bool)
    in_fit[fit_index] = True
    rms = float(np.sqrt(np.mean(r2)))

    scatter_excess = np.full(nstars, np.nan)
    scatter_excess[computable] = y[computable] - X[computable] @ coefficients

    finite_excess = np.isfinite(scatter_excess)
    in_master = np.zeros(nstars, dtype=bool)
    if finite_excess.any():
        limit = params.fit_outlier_threshold * average(np.abs(scatter_excess[finite_excess]))
        in_master[finite_excess] = enough[finite_excess] & (scatter_excess[finite_excess] <= limit)

    return ScatterFitResult(
        coefficients=coefficients,
        scatter_excess=scatter_excess,
        in_fit=in_fit,
        usable=usable,
        n_fits=n_fits,
        rms=rms,
        in_master=in_master,
    )
