"""Diagnostics of a PRF model (psfmachine's ``get_psf_metrics``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PSFMetrics", "psf_metrics"]


@dataclass(eq=False)
class PSFMetrics:
    """Diagnostics of the model (psfmachine's ``get_psf_metrics``).

    Attributes
    ----------
    source_psf_fraction : numpy.ndarray
        (nsources,) fraction of each source's model (its flux inside ``rmax``) that lands on the frame,
        integrated with sub-pixel sampling (1 for a star fully on the frame).
    perturbed_ratio_mean, perturbed_std : numpy.ndarray or None
        psfmachine derives these from its time (perturbation) model; this implementation builds no time
        model, so they are ``None``.
    """

    source_psf_fraction: np.ndarray
    perturbed_ratio_mean: np.ndarray | None = None
    perturbed_std: np.ndarray | None = None
    notes: dict = field(default_factory=dict)


def psf_metrics(model, wcs=None, shape=None) -> PSFMetrics:
    """The work of :meth:`PRFModel.get_psf_metrics <photref_core.prf.model.PRFModel.get_psf_metrics>`
    (documented there) for ``model``."""
    g = model.frames.geometry(wcs, shape)
    sm = model.shape
    n = model.params.psf_subsample
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
    return PSFMetrics(source_psf_fraction=frac, notes={"time_model": "none: perturbed_* not computed"})
