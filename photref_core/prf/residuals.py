"""How well a PRF model explains the pixels: the chi image of the reference frame and its chi^2 per dof.

:func:`residual_map` fits the reference frame (the mean frame the shape was built on, or the
``frame_index`` frame) and returns (data - model) / error on its pixel grid with the chi^2 per degree of
freedom over the source pixels, plain and robust. :class:`MeanFrame` averages frames one batch at a time
(as :func:`~.inputs.reference_epochs` does for the build), so the reference frame is made in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fluxfit import model_image, solve_batch

__all__ = ["MeanFrame", "ResidualMap", "residual_map", "robust_chi2_per_dof"]

#: Median of a chi^2 variable of one degree of freedom: median(chi^2) / this estimates the chi^2 per pixel
#: of well-behaved residuals, unmoved by a few outliers (cosmic rays, a badly fitted star).
CHI2_1_MEDIAN = 0.454936423119572


def robust_chi2_per_dof(chi, n_parameters: int = 0) -> float:
    """chi^2 per degree of freedom from the median of chi^2 (robust to a few outliers).

    ``median(chi^2) / CHI2_1_MEDIAN x n / (n - n_parameters)``; NaN when no degree of freedom is left.
    """
    chi = np.asarray(chi, float)
    chi = chi[np.isfinite(chi)]
    dof = chi.size - n_parameters
    if dof <= 0:
        return float("nan")
    return float(np.median(chi**2) / CHI2_1_MEDIAN * chi.size / dof)


class MeanFrame:
    """The mean of frames that share one WCS, added a batch at a time (good pixels only).

    Parameters
    ----------
    shape : tuple of int
        (ny, nx).
    """

    def __init__(self, shape):
        self.sum = np.zeros(shape)
        self.var = np.zeros(shape)
        self.n = np.zeros(shape)
        self.n_frames = 0

    def add(self, flux, err, mask=None) -> None:
        """Add (T, ny, nx) frames, errors and bad-pixel mask (non-finite values and errors <= 0 are bad)."""
        for t in range(flux.shape[0]):  # a running sum: no (T, ny, nx) float64 copy
            good = np.isfinite(flux[t]) & np.isfinite(err[t]) & (err[t] > 0)
            if mask is not None:
                good &= ~np.asarray(mask[t], bool)
            self.sum += np.where(good, flux[t], 0.0)
            self.var += np.where(good, np.asarray(err[t], float) ** 2, 0.0)
            self.n += good
            self.n_frames += 1

    def epoch(self, wcs) -> dict:
        """The mean frame as :func:`~.inputs.reference_epochs` gives it (``wcs``, ``flux``, ``err``,
        ``good``, ``n_frames``)."""
        good = self.n > 0
        n = np.maximum(self.n, 1)
        return {
            "wcs": wcs,
            "flux": np.where(good, self.sum / n, 0.0),
            "err": np.where(good, np.sqrt(self.var) / n, np.inf),
            "good": good,
            "n_frames": self.n_frames,
        }


@dataclass(eq=False)
class ResidualMap:
    """The reference frame's residuals (:func:`residual_map`).

    Attributes
    ----------
    chi : numpy.ndarray
        (ny, nx) (data - model) / error; NaN on bad pixels.
    model : numpy.ndarray
        (ny, nx) model image (fluxes fitted without prior).
    good, source_pixels : numpy.ndarray
        (ny, nx) bool: good pixels; the good pixels where the sources' model is at least the error.
    x, y : numpy.ndarray
        Source positions (0-based pixels).
    flagged : numpy.ndarray
        Per source: its flux is not reported (too little of it on good pixels, or its solve failed).
    chi2_per_dof, robust_chi2_per_dof : float
        Over the source pixels: sum(chi^2) / (n - p) and :func:`robust_chi2_per_dof`, with ``p`` the
        fitted parameters (sources, and the background when fitted).
    n_pixels, n_parameters, n_frames : int
    """

    chi: np.ndarray
    model: np.ndarray
    good: np.ndarray
    source_pixels: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flagged: np.ndarray
    chi2_per_dof: float
    robust_chi2_per_dof: float
    n_pixels: int
    n_parameters: int
    n_frames: int

    def summary(self) -> dict:
        """The figures (JSON-able)."""
        return {
            "chi2_per_dof": self.chi2_per_dof,
            "robust_chi2_per_dof": self.robust_chi2_per_dof,
            "source_pixels": self.n_pixels,
            "parameters": self.n_parameters,
            "frames": self.n_frames,
        }


def residual_map(model, epoch: dict) -> ResidualMap:
    """Fit the reference frame ``epoch`` (every source, no prior) and return its chi image.

    Parameters
    ----------
    model : PRFModel
    epoch : dict
        ``wcs``, ``flux``, ``err``, ``good``, ``n_frames`` (a :class:`MeanFrame` epoch or one of
        :func:`~.inputs.reference_epochs`).

    Returns
    -------
    ResidualMap
    """
    shape = epoch["flux"].shape
    plan = model.frames.plan(epoch["wcs"], shape)
    g = model.frames.geometry(epoch["wcs"], shape)
    ns = model.nsources
    good = np.asarray(epoch["good"], bool)
    flux, err = epoch["flux"].ravel()[None, :], epoch["err"].ravel()[None, :]
    solution = solve_batch(plan, flux, err, ~good.ravel()[None, :], np.zeros(ns), np.zeros(ns), model.params)
    flag, background, weights = solution[2][0], solution[4], solution[6]
    image = model_image(plan, weights, background)[0].reshape(shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        chi = np.where(good, (epoch["flux"] - image) / epoch["err"], np.nan)
    # Where the sources' light is at least the pixel's error: where a wrong PRF shows (the discs within
    # rmax cover most of a crowded frame, and its background pixels would pull every figure to ~1).
    source_pixels = good & (image - (0.0 if background is None else background[0]) >= epoch["err"])
    values = chi[source_pixels]
    fitted = int(np.sum(flag == 0)) + int(background is not None)
    dof = values.size - fitted
    return ResidualMap(
        chi=chi,
        model=image,
        good=good,
        source_pixels=source_pixels,
        x=np.asarray(g.xpix),
        y=np.asarray(g.ypix),
        flagged=flag != 0,
        chi2_per_dof=float(np.sum(values**2) / dof) if dof > 0 else float("nan"),
        robust_chi2_per_dof=robust_chi2_per_dof(values, fitted),
        n_pixels=int(values.size),
        n_parameters=fitted,
        n_frames=int(epoch["n_frames"]),
    )
