"""Diagnostics of a PRF model (psfmachine's ``get_psf_metrics``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

__all__ = ["PSFMetrics", "perturbed_ratios", "psf_metrics"]


@dataclass(eq=False)
class PSFMetrics:
    """Diagnostics of the model (psfmachine's ``get_psf_metrics``).

    Attributes
    ----------
    source_psf_fraction : numpy.ndarray
        (nsources,) fraction of each source's model (its flux inside ``rmax``) that lands on the frame,
        integrated with sub-pixel sampling (1 for a star fully on the frame).
    perturbed_ratio_mean, perturbed_std : numpy.ndarray or None
        (nsources,) with a time model: the time mean and standard deviation, over the time model's times, of
        the sum of the source's perturbed model over the sum of its unperturbed model
        (:func:`perturbed_ratios`): 1 and 0 when the time model has no perturbation. ``None`` without a
        time model.
    """

    source_psf_fraction: np.ndarray
    perturbed_ratio_mean: np.ndarray | None = None
    perturbed_std: np.ndarray | None = None
    notes: dict = field(default_factory=dict)


def psf_metrics(model, wcs=None, shape=None, npoints_per_pixel=None, times=None) -> PSFMetrics:
    """The work of :meth:`PRFModel.get_psf_metrics <photref_core.prf.model.PRFModel.get_psf_metrics>`
    (documented there) for ``model``."""
    g = model.frames.geometry(wcs, shape)
    sm = model.shape
    n = int(model.params.psf_subsample if npoints_per_pixel is None else npoints_per_pixel)
    if n < 1:
        raise ValueError(f"npoints_per_pixel must be >= 1, got {n}")
    s = (np.arange(n) + 0.5) / n - 0.5
    sy, sx = np.meshgrid(s, s, indexing="ij")
    sx, sy = sx.ravel(), sy.ravel()
    half_diag = np.sqrt(np.sum(g.jac**2, axis=(1, 2)) / 2)  # arcsec, half the pixel diagonal (approx.)
    near = g.r <= sm.rmax + 1.01 * half_diag[g.src]
    src = g.src[near]
    # A pixel whose centre lies within rmax - half its diagonal is wholly inside the disc (half_diag bounds
    # the distance of any point of the pixel from its centre): only the pixels on the disc's edge are
    # sub-sampled, the same answer for a fraction of the work.
    inside = np.ones(src.size)
    edge = np.flatnonzero(g.r[near] + half_diag[src] > sm.rmax)
    J = g.jac[src[edge]]
    xi0, eta0 = g.xi[near][edge], g.eta[near][edge]
    count = np.zeros(edge.size)
    for k in range(sx.size):  # n^2 sub-pixel offsets, each vectorised over the edge pixels
        xi = xi0 + J[:, 0, 0] * sx[k] + J[:, 0, 1] * sy[k]
        eta = eta0 + J[:, 1, 0] * sx[k] + J[:, 1, 1] * sy[k]
        count += np.hypot(xi, eta) <= sm.rmax
    inside[edge] = count / sx.size
    # PRF at the pixel centre; centres just beyond rmax (pixels straddling the edge) use r = rmax.
    val = 10.0 ** sm.log_value(np.minimum(g.r[near], sm.rmax), g.phi[near]) / sm.norm * g.area[src]
    frac = np.bincount(src, weights=val * inside, minlength=model.nsources)
    if model.time_model is None:
        return PSFMetrics(source_psf_fraction=frac, notes={"time_model": "none: perturbed_* not computed"})
    ratios, used = perturbed_ratios(model, wcs, shape, times)
    notes = {"times": used.tolist(), "perturbation": model.time_model.perturbation is not None}
    return PSFMetrics(
        source_psf_fraction=frac,
        perturbed_ratio_mean=ratios.mean(axis=0),
        perturbed_std=ratios.std(axis=0),
        notes=notes,
    )


def perturbed_ratios(model, wcs=None, shape=None, times=None):
    """Per time and source: the sum of the source's perturbed model over the sum of its model
    (psfmachine's perturbed ratio), with the time model's shape on the frame ``wcs`` at its median
    transform.

    Parameters
    ----------
    model : PRFModel
        With a time model.
    wcs : astropy.wcs.WCS, optional
    shape : tuple of int, optional
    times : array_like, optional
        Default: the perturbation's bin times (the time model's build times without a perturbation).

    Returns
    -------
    tuple
        ``(ratios, times)``: (ntimes, nsources) and the times used.
    """
    from .timemodel import _frame_pairs, moved_geometry

    tmod = model.time_model
    pert = tmod.perturbation
    if times is None:
        times = pert.diagnostics["bin_times"] if pert is not None else tmod.times
    times = np.atleast_1d(np.asarray(times, dtype=float))
    if pert is None:
        return np.ones((times.size, model.nsources)), times
    ny, nx = model.image_shape if shape is None else shape
    pairs = _frame_pairs(model, tmod.shape, model.wcs if wcs is None else wcs, (ny, nx))
    a = tmod.start(None)
    vals, _ = pairs.values(tmod.shape, a)
    mg = moved_geometry(pairs.geom, *pairs.shifts(a))
    # sum_p M_ip P_ip(t) = sum_p M_ip + (sum_p M_ip B_p) @ u(t): the design once, the times as a product.
    by_source = sparse.csr_array((vals, (mg.src, np.arange(vals.size))), shape=(model.nsources, vals.size))
    per_source = (by_source @ pert.spatial_design(mg.xi, mg.eta)).toarray()
    total = np.bincount(mg.src, weights=vals, minlength=model.nsources)
    u = np.stack([pert.spatial_weights(t) for t in times], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = 1.0 + (per_source @ u).T / total
    return ratios, times
