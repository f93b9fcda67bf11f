"""The per-frame magnitude fit (SPEC 9), vectorised over a batch of frames.

For every frame and photometry, ``ref_mag - mag`` is fitted with the columns of a fit-terms expression by
weighted least squares with iterative outlier rejection; the fitted magnitude ``mag + correction`` is then
applied to every star of the frame, also those left out of the fit.

How it is fast: the design of a batch of frames is built once, ``(frames, stars, terms)``; the normal
equations of all frames are formed with one batched matrix product and solved together; a rejection pass
only removes rows (weights set to zero) and re-solves the fits that are not finished. Measured target:
< 2 ms a frame at 1,000 stars x 3 photometries.

How it is well conditioned: raw magnitudes and pixel coordinates in ``O3{phot_g_mean_mag, x, y}`` give a
design whose condition number is ~1e12 (1e21 for the normal equations: useless). :func:`frame_design`
maps every rescalable inner term (:attr:`~photref_core.master.fitterms.FitTerms.rescalable`: the terms of
polynomial sets) of each frame onto [-1, 1] before the columns are formed, which leaves the fitted model
unchanged; the normal equations are then solved after a diagonal (Jacobi) scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..master.fitterms import FitTerms
from .parameters import MagfitParameters

__all__ = ["PhotometryFit", "fit_photometry", "frame_design", "fit_weights", "normalised_error"]

#: A fit whose Jacobi-scaled normal matrix has a smaller eigenvalue ratio is singular (terms that are
#: not independent over the frame's stars, e.g. all stars at one x).
SINGULAR_RATIO = 1e-12


def frame_design(terms: FitTerms, columns: Mapping[str, np.ndarray], measured: np.ndarray) -> np.ndarray:
    """The design of a batch of frames, every rescalable term of each frame mapped onto [-1, 1].

    Parameters
    ----------
    terms : FitTerms
        The correction's expression.
    columns : mapping of str to array
        Every variable the expression uses, each of shape ``(frames, stars)`` or ``(stars,)`` (catalog
        columns, the same in every frame).
    measured : numpy.ndarray
        Bool ``(frames, stars)``: the stars measured in each frame; a term's centre and scale in a frame
        come from the middle and half-range of its finite values over these stars.

    Returns
    -------
    numpy.ndarray
        ``(frames, stars, n_terms)``, NaN where a star's predictors are not computable.
    """
    n_frames, n_stars = measured.shape
    flat = {
        name: np.broadcast_to(np.asarray(columns[name], dtype=np.float64), (n_frames, n_stars)).reshape(-1)
        for name in terms.variables
    }
    if not flat:  # an expression without variables: constants only
        flat = {"_": np.zeros(n_frames * n_stars)}
    values = terms.term_values(flat).reshape(n_frames, n_stars, -1)
    for i in np.flatnonzero(terms.rescalable):
        v = values[:, :, i]
        ok = measured & np.isfinite(v)
        lo = np.where(ok, v, np.inf).min(axis=1)
        hi = np.where(ok, v, -np.inf).max(axis=1)
        found = np.isfinite(lo) & np.isfinite(hi)  # a frame without any finite value: left as it is
        with np.errstate(invalid="ignore"):
            centre = np.where(found, (lo + hi) / 2, 0.0)
            half = np.where(found & (hi > lo), (hi - lo) / 2, 1.0)
        values[:, :, i] = (v - centre[:, None]) / half[:, None]
    return terms.expand(values)


def normalised_error(mag_err: np.ndarray, params: MagfitParameters) -> np.ndarray:
    """The error a residual is compared with in the rejection: ``sqrt(mag_err^2 + noise_offset^2)``."""
    return np.hypot(mag_err, params.noise_offset)


def fit_weights(mag_err: np.ndarray, params: MagfitParameters) -> np.ndarray:
    """The least-squares weight of each measurement (see :class:`MagfitParameters` ``magfit_weighting``)."""
    if params.magfit_weighting == "inverse_variance":
        return 1.0 / (mag_err**2 + params.noise_offset**2)  # 1 / normalised_error^2
    if params.magfit_weighting == "autowisp":
        return 1.0 / (mag_err + params.noise_offset) ** 2
    return np.ones_like(mag_err)


@dataclass(frozen=True)
class PhotometryFit:
    """One photometry's fits over a batch of frames.

    Attributes
    ----------
    correction : numpy.ndarray
        ``(frames, stars)``: the fitted ``ref_mag - mag`` for every star with computable predictors (NaN
        otherwise, and for a failed frame).
    coefficients : numpy.ndarray
        ``(frames, terms)`` (NaN for a failed frame), in the rescaled design of :func:`frame_design`.
    used : numpy.ndarray
        Bool ``(frames, stars)``: the stars in the final fit.
    n_candidates, n_used, n_fits : numpy.ndarray
        Per frame: stars eligible for the fit, stars in the final fit, fits made (1 + rejection refits).
    chi_rms : numpy.ndarray
        Per frame: root mean square of the normalised residuals of the final fit.
    problem : list of str or None
        Per frame: why the fit failed (too few stars, singular terms), None when it did not.
    """

    correction: np.ndarray
    coefficients: np.ndarray
    used: np.ndarray
    n_candidates: np.ndarray
    n_used: np.ndarray
    n_fits: np.ndarray
    chi_rms: np.ndarray
    problem: list


def fit_photometry(
    design: np.ndarray,
    target: np.ndarray,
    mag_err: np.ndarray,
    eligible: np.ndarray,
    params: MagfitParameters,
    computable: np.ndarray | None = None,
) -> PhotometryFit:
    """Weighted least squares with iterative rejection, for every frame of a batch at once.

    Parameters
    ----------
    design : numpy.ndarray
        ``(frames, stars, terms)`` from :func:`frame_design`.
    target : numpy.ndarray
        ``(frames, stars)``: ``ref_mag - mag``.
    mag_err : numpy.ndarray
        ``(frames, stars)``: the measurements' errors.
    eligible : numpy.ndarray
        Bool ``(frames, stars)`` or ``(stars,)``: stars that may enter the fit at all (e.g. in the
        catalog); the finite, ``0 < mag_err <= max_mag_err`` cut is applied here.
    params : MagfitParameters
    computable : numpy.ndarray, optional
        Bool ``(frames, stars)``: the stars whose predictors are all finite, when the caller fits several
        photometries with one design: it then also sets those rows of ``design`` to 0 (once, instead of
        every fit). Default: worked out here from ``design``'s NaNs.

    Returns
    -------
    PhotometryFit
    """
    n_frames, n_stars, n_terms = design.shape
    if computable is None:
        computable = np.isfinite(design).all(axis=2)
        X = np.where(computable[:, :, None], design, 0.0)
    else:
        X = design
    with np.errstate(invalid="ignore"):
        keep = (
            np.broadcast_to(eligible, (n_frames, n_stars))
            & computable
            & np.isfinite(target)
            & np.isfinite(mag_err)
            & (mag_err > 0)
            & (mag_err <= params.max_mag_err)
        )
    y = np.where(keep, target, 0.0)
    err = np.where(keep, mag_err, 1.0)
    weight = fit_weights(err, params)
    inv_sigma = 1.0 / normalised_error(err, params)
    n_candidates = keep.sum(axis=1)
    min_stars = params.min_stars(n_terms)

    coefficients = np.full((n_frames, n_terms), np.nan)
    chi_rms = np.full(n_frames, np.nan)
    n_fits = np.zeros(n_frames, np.int64)
    problem: list[str | None] = [None] * n_frames
    # The normal equations of every frame, built once; a rejection removes its rows from them.
    w = np.where(keep, weight, 0.0)
    Xw = X * w[:, :, None]
    A = np.matmul(Xw.transpose(0, 2, 1), X)
    rhs = np.einsum("bst,bs->bt", Xw, y)
    n_used = n_candidates.copy()
    active = np.arange(n_frames)
    threshold2 = params.magfit_rejection_level**2
    for refit in range(params.magfit_max_rejection_iterations + 1):
        few = n_used[active] < min_stars
        for b in active[few]:
            problem[b] = (
                f"{n_used[b]} usable stars for {n_terms} terms (needs {min_stars}: min_stars_per_term)"
            )
        active = active[~few]
        if active.size == 0:
            break
        # Jacobi scaling, then a singularity test on the scaled matrix's eigenvalues.
        Aa = A[active]
        diag = np.einsum("btt->bt", Aa)
        scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
        As = Aa * scale[:, :, None] * scale[:, None, :]
        eig = np.linalg.eigvalsh(As)
        singular = (diag <= 0).any(axis=1) | (eig[:, 0] <= SINGULAR_RATIO * eig[:, -1])
        for b in active[singular]:
            problem[b] = "the fit terms are not independent over the frame's stars (singular fit)"
        As[singular] = np.eye(n_terms)
        coef = scale * np.linalg.solve(As, (scale * rhs[active])[:, :, None])[:, :, 0]
        active, coef = active[~singular], coef[~singular]
        n_fits[active] += 1
        coefficients[active] = coef
        if active.size == 0:
            break
        # Residuals of every frame (one batched product: cheaper than copying the active frames' design);
        # only the active frames' stars can be rejected.
        is_active = np.zeros(n_frames, bool)
        is_active[active] = True
        current = np.where(np.isfinite(coefficients), coefficients, 0.0)
        z = (y - np.matmul(X, current[:, :, None])[:, :, 0]) * inv_sigma
        kept = keep & is_active[:, None]
        z2 = np.where(kept, z * z, 0.0)
        mean_z2 = z2[active].sum(axis=1) / n_used[active]
        chi_rms[active] = np.sqrt(mean_z2)
        if refit == params.magfit_max_rejection_iterations:
            break  # no refit left: the last fit's stars stay its stars
        limit = np.zeros(n_frames)
        limit[active] = threshold2 * mean_z2
        frames, stars = np.nonzero(kept & (z2 > limit[:, None]))
        if frames.size == 0:
            break
        keep[frames, stars] = False
        # Remove the rejected rows from the normal equations, summed per frame (rows come frame by frame).
        Xr = X[frames, stars]
        wr = w[frames, stars]
        active, starts, counts = np.unique(frames, return_index=True, return_counts=True)
        A[active] -= np.add.reduceat(wr[:, None, None] * Xr[:, :, None] * Xr[:, None, :], starts, axis=0)
        rhs[active] -= np.add.reduceat((wr * y[frames, stars])[:, None] * Xr, starts, axis=0)
        n_used[active] -= counts
    failed = np.array([p is not None for p in problem], dtype=bool)
    coefficients[failed] = np.nan
    chi_rms[failed] = np.nan
    correction = np.einsum("bst,bt->bs", X, np.nan_to_num(coefficients))
    correction[~computable | failed[:, None]] = np.nan
    keep[failed] = False
    return PhotometryFit(
        correction=correction,
        coefficients=coefficients,
        used=keep,
        n_candidates=n_candidates,
        n_used=keep.sum(axis=1),
        n_fits=n_fits,
        chi_rms=chi_rms,
        problem=problem,
    )
