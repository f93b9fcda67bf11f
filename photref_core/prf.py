"""PRF photometry: one shape model for a field, then every source flux in every frame (SPEC 6).

This is the psfmachine ``Machine`` (Hedges et al. 2021, AJ 162, 107; RomanCuts parameter names and
defaults) done right, on numpy arrays. The lead wires it to files, the store and flows.

What it does
------------
1. **Geometry** (:func:`build_geometry`). For every source, the frame pixels whose centres lie within
   ``sparse_dist_lim`` arcsec, with their offsets on the tangent plane at the source (gnomonic standard
   coordinates: ``xi ~ dra cos(dec)`` east, ``eta ~ ddec`` north, exact for any separation and pole-safe),
   ``r = hypot(xi, eta)`` (arcsec) and ``phi = arctan2(eta, xi)``. Stored as flat arrays of (source, pixel)
   pairs sorted by source -- i.e. the CSR layout of a sparse (nsources x npixels) matrix -- and built
   vectorised (integer pixel offsets broadcast against all sources; chunks bound the memory, there is no
   Python loop over sources).
2. **Masks.** ``source_mask``: pixels where a source's estimated flux exceeds ``flux_cut_off`` (the radius
   grows with brightness). The first estimate is ``flux_estimate x`` an empirical radial profile (the
   inverse-variance weighted median of data/flux-estimate in radial bins); later ones use the fitted model
   (the empirical profile beyond ``rmax``). ``uncontaminated_source_mask``: pixels of one source's mask
   only. Pixels are selected on these estimates, never on the data (no selection bias).
3. **Shape model** (:class:`ShapeModel`). ``log10(data / F_source)`` on uncontaminated good pixels with
   ``r <= rmax`` is fitted by weighted linear least squares (weights from the flux errors,
   ``sigma_log = err / (data ln 10)``) with Gaussian priors on the weights and iterative robust clipping,
   then refined by Gauss-Newton steps in linear flux space (working data ``S + (f - m) / (m ln 10)``,
   weights from the model ``m``), which removes the bias of the logarithm of noisy wing pixels. A free
   log-flux offset per source, eliminated exactly, absorbs the error of each flux estimate. The basis is
   the product of a periodic cubic B-spline in ``phi`` (``n_phi_knots`` functions) and a clamped cubic
   B-spline in ``r`` on ``[0, rmax]`` with breakpoints uniform in ``sqrt(r)`` from ``rmin`` to ``rmax``;
   radial functions whose knots all lie inside ``cut_r`` carry no ``phi`` dependence (so the model is
   single-valued at the centre). Both bases come from ``scipy.interpolate.BSpline.design_matrix``. The
   masks and the shape fit are repeated ``shape_iterations`` times (the first masks use the catalog flux
   estimates, later ones the fluxes fitted on the reference image: the catalog flux only seeds).
4. **Normalisation** (the psfmachine fix). The PRF integrates to 1 over the disc ``r <= rmax`` with the
   ``r dr dphi`` Jacobian, in pixel-area units: ``mean_model[i, p] = 10**S(r, phi) * A_i / N`` with
   ``N = int_0^rmax int_0^2pi 10**S r dr dphi`` (arcsec^2, Gauss-Legendre x periodic trapezoid) and
   ``A_i`` the pixel area at the source (arcsec^2, from the local WCS Jacobian). A fitted flux is thus the
   source flux inside ``rmax``, and for an isolated star fully on the frame its ``mean_model`` row sums
   to ~1 (its encircled energy inside ``rmax``, up to pixelisation of the disc edge).
5. **Flux fit** (:meth:`PRFModel.fit`). For each frame ``t``:
   ``(X^T C_t^-1 X + diag(1/sigma^2)) w_t = X^T C_t^-1 f_t + mu/sigma^2``, ``X = mean_model^T``,
   ``C_t = diag(err_t^2)``, ``flux_err = sqrt(diag((X^T C_t^-1 X + diag(1/sigma^2))^-1))``. Sources that
   share no model pixel are independent: the overlap graph is split with
   ``scipy.sparse.csgraph.connected_components`` and each group's small dense system is solved for all
   frames of a batch at once (``numpy.linalg.inv`` over a (groups, frames) batch axis, groups of equal
   size together). The per-frame normal matrices come from ONE sparse product ``P @ W`` where
   ``P[(i, j), p] = X[p, i] X[p, j]``; no dense nsources x nsources matrix is ever formed. An optional
   constant background per frame (flat prior, all good pixels of the frame) couples every group; it is
   eliminated exactly with a Schur complement, so groups stay independent.

Decisions where SPEC 6 is silent are documented on :class:`PRFParameters` and :meth:`PRFModel.fit`.
No time model (psfmachine's perturbation model) is built: :meth:`PRFModel.get_psf_metrics` says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from scipy import sparse
from scipy.interpolate import BSpline
from scipy.sparse.csgraph import connected_components

from .errors import BadInputError

__all__ = [
    "FLAG_LOW_COVERAGE",
    "FLAG_SOLVE_FAILED",
    "FitResult",
    "Geometry",
    "PRFModel",
    "PRFParameters",
    "PSFMetrics",
    "ShapeModel",
    "build_geometry",
    "default_error",
]

#: Flag bit: less than ``min_good_fraction`` (default half) of the source's model lies on good pixels of
#: the frame (masked, non-finite, or off the frame); its flux and error are NaN.
FLAG_LOW_COVERAGE = 1
#: Flag bit: the source's group system could not be solved (singular) or gave a non-finite answer.
FLAG_SOLVE_FAILED = 2

_RAD2ARCSEC = 180.0 / math.pi * 3600.0
_SOLVE_CHUNK = 4_000_000  # float64 elements of one batch of group matrices (32 MB)
_CACHE_SIZE = 8  # geometries / mean models / solve plans kept per model (one per distinct WCS)
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class PRFParameters:
    """Parameters of the PRF model, with the RomanCuts ``Machine`` names and defaults (0.11"/pix).

    Every radius is in ARCSEC on the sky, so a Kepler/TESS-scale field (4"/pix, 21"/pix) is fitted by
    passing radii scaled to its pixels.

    Parameters
    ----------
    n_r_knots : int
        Radial breakpoints (uniform in sqrt(r) from ``rmin`` to ``rmax``); the radial basis has
        ``n_r_knots + 3`` cubic B-splines on ``[0, rmax]``. At least 2.
    n_phi_knots : int
        Periodic cubic B-splines in the position angle. At least 4.
    rmin, rmax : float
        First and last radial breakpoint (arcsec), ``0 < rmin < rmax``. The model is zero beyond ``rmax``.
    cut_r : float
        Radial basis functions whose knots all lie within ``cut_r`` (arcsec) have no phi dependence.
        ``0 <= cut_r < rmax``.
    sparse_dist_lim : float
        Radius (arcsec) of the per-source pixel neighbourhood (geometry and masks); ``>= rmax``.
    sources_flux_column : str
        Catalog column with the flux estimate (:meth:`PRFModel.from_catalog`).
    time_mask : array_like of bool, optional
        Frames used for the shape model (``None``: all).
    flux_cut_off : float, optional
        Data units. A pixel is in a source's ``source_mask`` where the source's estimated flux there exceeds
        it. ``None`` (default): 3 x the median pixel error of the reference image, i.e. "detected at 3 sigma"
        whatever the data units (psfmachine's fixed default of 1 only suits e-/s data).
    frame_index : 'mean' or int
        Reference image for the shape model: the mean of the ``time_mask`` frames (per distinct WCS) or
        one frame.
    bin_data : bool or int
        ``False``/``0``/``None``: fit every pixel. An integer ``n >= 4``: form the shape fit's normal
        equations on the data averaged (inverse-variance weighted) in ``n`` radial bins uniform in sqrt(r)
        on ``[0, rmax]`` x ``n`` angular bins, each bin one point at its weighted mean (r, phi); the
        per-source offsets are then alternated with the shape instead of eliminated, and clipping still
        acts on individual pixels. ``True``: ``n = 4 * max(n_r_knots, n_phi_knots)``. For very large
        fields; costs some accuracy in the core, where the profile varies within a bin.
    prior_mu, prior_sigma : float or array_like, optional
        Gaussian prior of the flux fit, per source (scalars broadcast; ``prior_sigma`` may be ``inf``).
        Default ``prior_mu``: the fluxes of a prior-free fit on the reference image. Default
        ``prior_sigma``: ``prior_sigma_factor * sqrt(mu^2 + e^2)``, ``e`` the single-frame-equivalent
        error of that fit (so a faint star with mu ~ 0 is not pinned to 0); a source whose mu is not finite
        gets mu = 0 and ``prior_sigma_factor`` x the largest finite |mu|.
    prior_sigma_factor : float
        See ``prior_sigma`` (default 10: the prior shifts a star's flux by < 1 % of its error).
    shape_prior_sigma : float
        Width (dex) of the Gaussian prior on every shape weight, centred on the empirical radial profile;
        it only matters where the data do not constrain the shape.
    shape_phi_smooth : float or None
        Width (dex) of a Gaussian prior on the difference of neighbouring angular weights of each radial
        function (a roughness penalty: it damps angular noise in the faint wing, where few pixels
        constrain 15 angular copies; the data override it in the core). ``None``: no such prior.
    clip_sigma : float
        Shape-fit clipping: pixels whose normalised residual (in log space for the first fit, in flux in
        the Gauss-Newton steps) is further than ``clip_sigma`` robust standard deviations (1.4826 x MAD)
        from the median are dropped.
    clip_iterations : int
        Maximum number of clipping passes (0: none).
    shape_iterations : int
        Rounds of masks + shape fit; each after the first builds its masks from the previous model and
        the fluxes it fitted on the reference image. The Gauss-Newton refinement runs in the last.
    crowded_dominance : float or None
        Crowded fields: when fewer than 10 x (number of shape weights) uncontaminated pixels are usable,
        the shape is fitted instead on the pixels where a source's estimated flux is at least this
        fraction of all sources' estimated flux, after subtracting the others' estimates (the estimates
        improve with ``shape_iterations``; use 3-4 there). ``None``: never (SPEC's strict rule; too few
        pixels is then an error).
    fit_background : bool
        Fit a constant background per frame (flat prior) together with the fluxes.
    min_good_fraction : float
        A source with less than this fraction of its model on good pixels of a frame gets NaN flux and
        :data:`FLAG_LOW_COVERAGE` (SPEC: half).
    psf_subsample : int
        Sub-pixel samples per axis for :meth:`PRFModel.get_psf_metrics`.
    """

    n_r_knots: int = 10
    n_phi_knots: int = 15
    rmin: float = 0.1
    rmax: float = 2.0
    cut_r: float = 0.2
    sparse_dist_lim: float = 4.0
    sources_flux_column: str = "flux"
    time_mask: np.ndarray | None = None
    flux_cut_off: float | None = None
    frame_index: str | int = "mean"
    bin_data: bool | int | None = False
    prior_mu: np.ndarray | float | None = None
    prior_sigma: np.ndarray | float | None = None
    prior_sigma_factor: float = 10.0
    shape_prior_sigma: float = 1.0
    shape_phi_smooth: float | None = 0.1
    clip_sigma: float = 4.0
    clip_iterations: int = 3
    shape_iterations: int = 2
    crowded_dominance: float | None = 0.8
    fit_background: bool = False
    min_good_fraction: float = 0.5
    psf_subsample: int = 5

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Check every parameter; raise ``ValueError`` naming the first bad one.

        Returns
        -------
        PRFParameters
            ``self``, for chaining.
        """

        def is_int(v):
            return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)

        def is_num(v):
            num = isinstance(v, int | float | np.integer | np.floating)
            return num and not isinstance(v, bool | np.bool_)

        for name, lo in (
            ("n_r_knots", 2),
            ("n_phi_knots", 4),
            ("shape_iterations", 1),
            ("clip_iterations", 0),
            ("psf_subsample", 1),
        ):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"PRF parameter {name} must be an integer >= {lo}, got {v!r}")
        for name in (
            "rmin",
            "rmax",
            "cut_r",
            "sparse_dist_lim",
            "prior_sigma_factor",
            "shape_prior_sigma",
            "clip_sigma",
            "min_good_fraction",
        ):
            v = getattr(self, name)
            if not is_num(v) or not np.isfinite(v):
                raise ValueError(f"PRF parameter {name} must be a finite number, got {v!r}")
        if not 0 < self.rmin < self.rmax:
            raise ValueError(
                f"PRF parameters need 0 < rmin < rmax (arcsec), got rmin={self.rmin}, rmax={self.rmax}"
            )
        if not 0 <= self.cut_r < self.rmax:
            raise ValueError(f"PRF parameter cut_r must be in [0, rmax={self.rmax}) arcsec, got {self.cut_r}")
        if self.sparse_dist_lim < self.rmax:
            raise ValueError(
                f"PRF parameter sparse_dist_lim ({self.sparse_dist_lim} arcsec) must be >= rmax "
                f"({self.rmax} arcsec): the model would be cut off"
            )
        if self.shape_phi_smooth is not None and (
            not is_num(self.shape_phi_smooth) or not 0 < self.shape_phi_smooth < np.inf
        ):
            raise ValueError(
                f"PRF parameter shape_phi_smooth must be None or a number > 0 (dex), "
                f"got {self.shape_phi_smooth!r}"
            )
        cd = self.crowded_dominance
        if cd is not None and (not is_num(cd) or not 0.5 < cd <= 1):
            raise ValueError(f"PRF parameter crowded_dominance must be None or in (0.5, 1], got {cd!r}")
        for name in ("prior_sigma_factor", "shape_prior_sigma", "clip_sigma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PRF parameter {name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.min_good_fraction <= 1:
            raise ValueError(
                f"PRF parameter min_good_fraction must be in (0, 1], got {self.min_good_fraction}"
            )
        if not isinstance(self.sources_flux_column, str) or not self.sources_flux_column:
            raise ValueError(
                f"PRF parameter sources_flux_column must be a column name, got {self.sources_flux_column!r}"
            )
        if self.flux_cut_off is not None and (
            not is_num(self.flux_cut_off) or not self.flux_cut_off >= 0 or not np.isfinite(self.flux_cut_off)
        ):
            raise ValueError(
                f"PRF parameter flux_cut_off must be None or a finite number >= 0 (data units), "
                f"got {self.flux_cut_off!r}"
            )
        fi = self.frame_index
        if not (fi == "mean" if isinstance(fi, str) else is_int(fi)):
            raise ValueError(f"PRF parameter frame_index must be 'mean' or an integer, got {fi!r}")
        b = self.bin_data
        if not (b is None or isinstance(b, bool | np.bool_) or (is_int(b) and (b == 0 or b >= 4))):
            raise ValueError(f"PRF parameter bin_data must be False, True or an integer >= 4, got {b!r}")
        if not isinstance(self.fit_background, bool | np.bool_):
            raise ValueError(f"PRF parameter fit_background must be a bool, got {self.fit_background!r}")
        if self.time_mask is not None:
            tm = np.asarray(self.time_mask)
            if tm.ndim != 1 or tm.dtype != bool:
                raise ValueError("PRF parameter time_mask must be a 1-d boolean array (one entry per frame)")
            if not tm.any():
                raise ValueError("PRF parameter time_mask selects no frame")
            self.time_mask = tm
        for name in ("prior_mu", "prior_sigma"):
            v = getattr(self, name)
            if v is None:
                continue
            a = np.asarray(v, dtype=float)
            if a.ndim > 1:
                raise ValueError(f"PRF parameter {name} must be a scalar or a 1-d array (one per source)")
            if name == "prior_mu" and not np.all(np.isfinite(a)):
                raise ValueError("PRF parameter prior_mu must be finite")
            if name == "prior_sigma" and not np.all(a > 0):
                raise ValueError("PRF parameter prior_sigma must be > 0 (inf allowed: no prior)")
        return self

    @property
    def n_bins(self) -> int:
        """Bins per axis of ``bin_data`` (0: no binning)."""
        if self.bin_data is None or self.bin_data is False:
            return 0
        if self.bin_data is True:
            return 4 * max(self.n_r_knots, self.n_phi_knots)
        return int(self.bin_data)

    def to_dict(self) -> dict:
        """JSON-safe dict of the scalar parameters (arrays become lists).

        Returns
        -------
        dict
        """
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PRFParameters:
        """Inverse of :meth:`to_dict` (unknown keys are an error).

        Parameters
        ----------
        d : dict

        Returns
        -------
        PRFParameters
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PRF parameter(s): {sorted(unknown)}")
        d = dict(d)
        if d.get("time_mask") is not None:
            d["time_mask"] = np.asarray(d["time_mask"], dtype=bool)
        for k in ("prior_mu", "prior_sigma"):
            if isinstance(d.get(k), list):
                d[k] = np.asarray(d[k], dtype=float)
        return cls(**d)


def default_error(flux, gain=1.0, rdnoise=0.0):
    """SPEC 1.3 error image: ``sqrt(max(flux, 0) / GAIN + RDNOISE^2)``.

    Parameters
    ----------
    flux : array_like
        Background-subtracted image(s), data units.
    gain : float
        e- per data unit.
    rdnoise : float
        Read noise in data units.

    Returns
    -------
    numpy.ndarray
    """
    flux = np.asarray(flux, dtype=float)
    return np.sqrt(np.maximum(np.nan_to_num(flux, nan=0.0), 0.0) / gain + rdnoise**2)


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------
def _gnomonic(ra0, dec0, ra, dec):
    """Standard coordinates (xi east, eta north; arcsec) of (ra, dec) on the tangent plane at (ra0, dec0)."""
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    da = a - a0
    cd, sd, cd0, sd0, cda = np.cos(d), np.sin(d), np.cos(d0), np.sin(d0), np.cos(da)
    cosc = sd0 * sd + cd0 * cd * cda
    xi = cd * np.sin(da) / cosc
    eta = (cd0 * sd - sd0 * cd * cda) / cosc
    return xi * _RAD2ARCSEC, eta * _RAD2ARCSEC


@dataclass(eq=False)
class Geometry:
    """(source, pixel) pairs within ``dist_lim`` of each source, sorted by source (CSR layout).

    Attributes
    ----------
    shape : tuple of int
        Frame shape (ny, nx); pixels are flattened row-major (``p = y * nx + x``).
    src, pix : numpy.ndarray
        Source index and flat pixel index of every pair.
    xi, eta, r, phi : numpy.ndarray
        Tangent-plane offsets of the pixel centre from the source (arcsec), radius (arcsec), angle (rad,
        from +xi (east) towards +eta (north)).
    indptr : numpy.ndarray
        CSR row pointer: the pairs of source ``i`` are ``indptr[i]:indptr[i+1]``.
    jac : numpy.ndarray
        (nsources, 2, 2) d(xi, eta)/d(x, y) at each source (arcsec per pixel).
    area : numpy.ndarray
        Pixel area at each source (arcsec^2).
    xpix, ypix : numpy.ndarray
        Source positions in 0-based pixel coordinates.
    """

    shape: tuple
    src: np.ndarray
    pix: np.ndarray
    xi: np.ndarray
    eta: np.ndarray
    r: np.ndarray
    phi: np.ndarray
    indptr: np.ndarray
    jac: np.ndarray
    area: np.ndarray
    xpix: np.ndarray
    ypix: np.ndarray

    @property
    def nsources(self) -> int:
        """Number of sources."""
        return self.area.size

    @property
    def npixels(self) -> int:
        """Number of frame pixels."""
        return int(self.shape[0] * self.shape[1])

    def matrix(self, values, select=None) -> sparse.csr_array:
        """A sparse (nsources x npixels) matrix with ``values`` at the pairs (optionally a subset).

        Parameters
        ----------
        values : array_like
            One value per pair (or a scalar).
        select : numpy.ndarray of bool, optional
            Pairs to keep.

        Returns
        -------
        scipy.sparse.csr_array
        """
        values = np.broadcast_to(np.asarray(values), self.src.shape)
        src, pix = self.src, self.pix
        if select is not None:
            src, pix, values = src[select], pix[select], values[select]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=self.nsources))])
        return sparse.csr_array((np.asarray(values), pix, indptr), shape=(self.nsources, self.npixels))


def build_geometry(wcs, shape, ra, dec, dist_lim, chunk_pairs=4_000_000) -> Geometry:
    """Pixels within ``dist_lim`` arcsec of every source, with tangent-plane offsets (vectorised).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS of the frame.
    shape : tuple of int
        Frame shape (ny, nx).
    ra, dec : array_like
        Source positions (degrees).
    dist_lim : float
        Neighbourhood radius (arcsec).
    chunk_pairs : int
        Candidate pairs handled at once (memory bound; each chunk is one vectorised step).

    Returns
    -------
    Geometry
    """
    ny, nx = int(shape[0]), int(shape[1])
    ra = np.asarray(ra, dtype=float)
    dec = np.asarray(dec, dtype=float)
    ns = ra.size
    with np.errstate(invalid="ignore"):
        xs, ys = wcs.all_world2pix(ra, dec, 0)
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    # Local Jacobian d(xi, eta)/d(x, y) at each source, by central differences of the WCS.
    h = 0.5
    px = np.concatenate([xs + h, xs - h, xs, xs])
    py = np.concatenate([ys, ys, ys + h, ys - h])
    wra, wdec = wcs.all_pix2world(px, py, 0)
    xi, eta = _gnomonic(np.tile(ra, 4), np.tile(dec, 4), wra, wdec)
    xi, eta = xi.reshape(4, ns), eta.reshape(4, ns)
    jac = np.empty((ns, 2, 2))
    jac[:, 0, 0] = (xi[0] - xi[1]) / (2 * h)
    jac[:, 1, 0] = (eta[0] - eta[1]) / (2 * h)
    jac[:, 0, 1] = (xi[2] - xi[3]) / (2 * h)
    jac[:, 1, 1] = (eta[2] - eta[3]) / (2 * h)
    area = np.abs(jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0])
    ok = np.isfinite(xs) & np.isfinite(ys) & np.isfinite(area) & (area > 0)
    # Box half-size in pixels: dist_lim over the smallest local pixel scale (+1 for rounding).
    with np.errstate(invalid="ignore", divide="ignore"):
        smin = np.sqrt(np.linalg.eigvalsh(np.einsum("sji,sjk->sik", jac, jac))[:, 0])
    smin_ok = smin[ok & (smin > 0)]
    half = int(np.ceil(dist_lim / smin_ok.min())) + 1 if smin_ok.size else 0
    off = np.arange(-half, half + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    # Sources whose box misses the frame entirely contribute nothing.
    cx, cy = np.rint(np.where(ok, xs, -1e9)), np.rint(np.where(ok, ys, -1e9))
    near = ok & (cx + half >= 0) & (cx - half < nx) & (cy + half >= 0) & (cy - half < ny)
    idx = np.flatnonzero(near)
    step = max(1, chunk_pairs // max(ox.size, 1))
    # Candidates: in the frame and, with the local Jacobian, within dist_lim (+ 1.5 px of slack for
    # rounding and distortion across the box); the exact test on the sky comes after.
    smax = np.sqrt(np.sum(jac**2, axis=(1, 2)))  # >= the largest local pixel scale
    lim2 = (dist_lim + 1.5 * smax) ** 2

    def candidates(sel):
        bx = cx[sel, None] + ox[None, :]
        by = cy[sel, None] + oy[None, :]
        dx = bx - xs[sel, None]
        dy = by - ys[sel, None]
        J = jac[sel]
        ax = J[:, 0, 0, None] * dx + J[:, 0, 1, None] * dy
        ay = J[:, 1, 0, None] * dx + J[:, 1, 1, None] * dy
        keep = (bx >= 0) & (bx < nx) & (by >= 0) & (by < ny) & (ax * ax + ay * ay <= lim2[sel, None])
        s = np.broadcast_to(sel[:, None], bx.shape)[keep]
        return s, (by[keep] * nx + bx[keep]).astype(np.int64)

    # World coordinates only of the pixels some source may reach (all of them in a crowded field).
    used = np.zeros(ny * nx, bool)
    for start in range(0, idx.size, step):
        used[candidates(idx[start : start + step])[1]] = True
    upix = np.flatnonzero(used)
    slot = np.full(ny * nx, -1, np.int64)
    slot[upix] = np.arange(upix.size)
    pra, pdec = wcs.all_pix2world((upix % nx).astype(float), (upix // nx).astype(float), 0)
    del used
    parts = []
    for start in range(0, idx.size, step):  # chunks of sources, each fully vectorised
        s, p = candidates(idx[start : start + step])
        pxi, peta = _gnomonic(ra[s], dec[s], pra[slot[p]], pdec[slot[p]])
        r = np.hypot(pxi, peta)
        keep = r <= dist_lim
        parts.append((s[keep], p[keep], pxi[keep], peta[keep], r[keep]))
    if parts:
        src, pix, pxi, peta, r = (np.concatenate(a) for a in zip(*parts, strict=True))
    else:
        src = np.zeros(0, np.int64)
        pix = np.zeros(0, np.int64)
        pxi = peta = r = np.zeros(0)
    src = src.astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=ns))]).astype(np.int64)
    return Geometry(
        shape=(ny, nx),
        src=src,
        pix=pix,
        xi=pxi,
        eta=peta,
        r=r,
        phi=np.arctan2(peta, pxi),
        indptr=indptr,
        jac=jac,
        area=area,
        xpix=xs,
        ypix=ys,
    )


# ---------------------------------------------------------------------------------------------------
# Shape model
# ---------------------------------------------------------------------------------------------------
class ShapeModel:
    """The PRF shape in polar coordinates: ``PRF(r, phi) = 10**S(r, phi) / norm`` for ``r <= rmax``.

    ``S`` is a linear combination of products of B-splines (see the module docstring); ``norm`` makes the
    surface density integrate to 1 over the disc ``r <= rmax`` (arcsec^2), so a pixel of area ``A``
    (arcsec^2) at offset (r, phi) receives the fraction ``A * 10**S / norm`` of the source flux in
    ``rmax``.

    Parameters
    ----------
    n_r_knots, n_phi_knots : int
        Radial breakpoints and periodic angular functions.
    rmin, rmax, cut_r : float
        Radii in arcsec (see :class:`PRFParameters`).
    weights : array_like, optional
        Basis weights (``nbasis``); zeros if omitted.
    """

    def __init__(self, n_r_knots, n_phi_knots, rmin, rmax, cut_r, weights=None):
        self.n_r_knots = int(n_r_knots)
        self.n_phi_knots = int(n_phi_knots)
        self.rmin, self.rmax, self.cut_r = float(rmin), float(rmax), float(cut_r)
        bp = np.linspace(np.sqrt(self.rmin), np.sqrt(self.rmax), self.n_r_knots) ** 2
        bp[-1] = self.rmax
        self.breakpoints = np.concatenate([[0.0], bp])
        #: Clamped cubic knot vector on [0, rmax].
        self.r_knots = np.concatenate([[0.0] * 4, bp[:-1], [self.rmax] * 4])
        self.n_radial = self.r_knots.size - 4
        # Radial functions whose knots all lie within cut_r lose their phi copies.
        self.n_cut = int(np.sum(self.r_knots[4 : 4 + self.n_radial] <= self.cut_r))
        h = 2 * np.pi / self.n_phi_knots
        #: Uniform knots for the periodic angular basis (base interval [0, 2 pi)).
        self.phi_knots = h * np.arange(-3, self.n_phi_knots + 4)
        self.nbasis = self.n_cut + (self.n_radial - self.n_cut) * self.n_phi_knots
        self.weights = np.zeros(self.nbasis) if weights is None else np.asarray(weights, dtype=float)
        if self.weights.shape != (self.nbasis,):
            raise ValueError(f"shape model needs {self.nbasis} weights, got {self.weights.shape}")
        self.norm = np.nan
        if weights is not None:
            self.normalise()

    # -- basis ----------------------------------------------------------------------------------------
    def radial_design(self, r) -> sparse.csr_array:
        """Radial B-spline design matrix (n x ``n_radial``) for ``0 <= r <= rmax``.

        Parameters
        ----------
        r : array_like

        Returns
        -------
        scipy.sparse.csr_array
        """
        r = np.clip(np.asarray(r, dtype=float), 0.0, self.rmax)
        return BSpline.design_matrix(r, self.r_knots, 3)

    def angular_design(self, phi) -> sparse.csr_array:
        """Periodic cubic B-spline design matrix (n x ``n_phi_knots``).

        Parameters
        ----------
        phi : array_like
            Angles in radians (any range).

        Returns
        -------
        scipy.sparse.csr_array
        """
        phi = np.mod(np.asarray(phi, dtype=float), 2 * np.pi)
        d = BSpline.design_matrix(phi, self.phi_knots, 3, extrapolate="periodic").tocsr()
        # The last 3 functions are the first 3 shifted by one period: fold them (periodic basis).
        # No duplicates (n_phi_knots >= 4 consecutive indices stay distinct); the slot order is kept so that
        # a row's first slot identifies its knot interval (used by _Blocks).
        d = sparse.csr_array(
            (d.data, d.indices % self.n_phi_knots, d.indptr), shape=(d.shape[0], self.n_phi_knots)
        )
        d.has_sorted_indices = False
        return d

    def design(self, r, phi) -> sparse.csr_array:
        """Full design matrix (n x ``nbasis``): phi-free inner radial functions, then r x phi products.

        Parameters
        ----------
        r, phi : array_like
            Radius (arcsec, ``<= rmax``) and angle (rad).

        Returns
        -------
        scipy.sparse.csr_array
        """
        r = np.asarray(r, dtype=float).ravel()
        n = r.size
        if n == 0:
            return sparse.csr_array((0, self.nbasis))
        rc, rv = _row_block(self.radial_design(r), n)
        pc, pv = _row_block(self.angular_design(np.asarray(phi, dtype=float).ravel()), n)
        # Row-wise products: radial slot a x angular slot b. A phi-free (inner) radial function gets one
        # entry (slot b = 0) with the radial value, since the angular functions sum to 1.
        free = rc < self.n_cut  # (n, 4)
        cols = self.n_cut + (rc[:, :, None] - self.n_cut) * self.n_phi_knots + pc[:, None, :]
        cols = np.where(free[:, :, None], rc[:, :, None], cols)
        vals = np.where(free[:, :, None], rv[:, :, None], rv[:, :, None] * pv[:, None, :])
        valid = ~free[:, :, None] | (np.arange(4) == 0)[None, None, :]
        indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=(1, 2)))])
        m = sparse.csr_array((vals[valid], cols[valid], indptr), shape=(n, self.nbasis))
        m.has_canonical_format = False  # no duplicates, but columns may wrap in phi: not sorted
        m.sort_indices()
        return m

    # -- values ---------------------------------------------------------------------------------------
    def log_value(self, r, phi):
        """``S(r, phi)`` (log10 of the unnormalised model); NaN beyond ``rmax``.

        Parameters
        ----------
        r, phi : array_like

        Returns
        -------
        numpy.ndarray
        """
        r = np.asarray(r, dtype=float)
        phi = np.broadcast_to(np.asarray(phi, dtype=float), r.shape)
        out = np.full(r.shape, np.nan)
        inside = r <= self.rmax
        if inside.any():
            out[inside] = self.design(r[inside], phi[inside]) @ self.weights
        return out

    def density(self, r, phi):
        """Normalised PRF surface density (per arcsec^2); 0 beyond ``rmax``.

        Parameters
        ----------
        r, phi : array_like

        Returns
        -------
        numpy.ndarray
        """
        s = self.log_value(r, phi)
        return np.where(np.isfinite(s), 10.0 ** np.nan_to_num(s, nan=-np.inf) / self.norm, 0.0)

    def normalise(self, n_gauss=8, n_phi=None):
        """Compute ``norm = int_0^rmax int_0^2pi 10**S r dr dphi`` (arcsec^2) by quadrature.

        Gauss-Legendre with ``n_gauss`` nodes on each radial knot span, periodic trapezoid with ``n_phi``
        (default ``16 * n_phi_knots``) angles.

        Parameters
        ----------
        n_gauss, n_phi : int

        Returns
        -------
        float
        """
        n_phi = 16 * self.n_phi_knots if n_phi is None else n_phi
        x, wx = np.polynomial.legendre.leggauss(n_gauss)
        a, b = self.breakpoints[:-1], self.breakpoints[1:]
        r = ((b - a)[:, None] * (x[None, :] + 1) / 2 + a[:, None]).ravel()
        wr = ((b - a)[:, None] / 2 * wx[None, :]).ravel()
        phi = np.arange(n_phi) * (2 * np.pi / n_phi)
        rr, pp = np.meshgrid(r, phi, indexing="ij")
        s = (self.design(rr.ravel(), pp.ravel()) @ self.weights).reshape(rr.shape)
        self.norm = float(np.sum(10.0**s * (wr * r)[:, None]) * (2 * np.pi / n_phi))
        return self.norm

    def encircled_energy(self, radius, n_gauss=8):
        """Fraction of the model flux (inside ``rmax``) within ``radius`` arcsec.

        Parameters
        ----------
        radius : float
        n_gauss : int

        Returns
        -------
        float
        """
        radius = min(float(radius), self.rmax)
        bp = self.breakpoints[self.breakpoints < radius]
        bp = np.concatenate([bp, [radius]])
        x, wx = np.polynomial.legendre.leggauss(n_gauss)
        a, b = bp[:-1], bp[1:]
        r = ((b - a)[:, None] * (x[None, :] + 1) / 2 + a[:, None]).ravel()
        wr = ((b - a)[:, None] / 2 * wx[None, :]).ravel()
        n_phi = 16 * self.n_phi_knots
        phi = np.arange(n_phi) * (2 * np.pi / n_phi)
        rr, pp = np.meshgrid(r, phi, indexing="ij")
        s = (self.design(rr.ravel(), pp.ravel()) @ self.weights).reshape(rr.shape)
        return float(np.sum(10.0**s * (wr * r)[:, None]) * (2 * np.pi / n_phi) / self.norm)


def _row_block(m, n: int):
    """Rows of a B-spline design matrix (<= 4 entries per row) as (n, 4) blocks of (column, value)."""
    m = sparse.csr_array(m)
    if m.indices.size == 4 * n and np.array_equal(m.indptr, np.arange(0, 4 * n + 1, 4)):
        return m.indices.reshape(n, 4).astype(np.int64), m.data.reshape(n, 4)
    m = m.tocoo()  # general layout (not what scipy produces today): pad every row to 4 slots
    order = np.lexsort((m.col, m.row))
    row, col, val = m.row[order], m.col[order], m.data[order]
    counts = np.bincount(row, minlength=n)
    if counts.max(initial=0) > 4:
        raise RuntimeError("unexpected B-spline design matrix layout")
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(row.size) - start[row]
    C = np.zeros((n, 4), np.int64)
    V = np.zeros((n, 4))
    C[row, slot] = col
    V[row, slot] = val
    # Padding slots must not collide with a real column of the row: give them the row's first column
    # and value 0 (duplicates of a zero are harmless after sum_duplicates in callers).
    pad = np.arange(4)[None, :] >= counts[:, None]
    C[pad] = np.broadcast_to(C[:, :1], C.shape)[pad]
    return C, V


# ---------------------------------------------------------------------------------------------------
# Grouped, batched flux solver
# ---------------------------------------------------------------------------------------------------
class _Plan:
    """The structure of the flux fit for one mean_model (one WCS): groups, pair products."""

    def __init__(self, X: sparse.csr_array):
        ns, npix = X.shape
        self.nsrc, self.npix = ns, npix
        X = sparse.csr_array(X)
        X.eliminate_zeros()
        self._pattern = (X.indptr.copy(), X.indices.copy())
        self.pix_u = np.unique(X.indices).astype(np.int64)
        nu = self.pix_u.size
        remap = np.full(npix, -1, np.int64)
        remap[self.pix_u] = np.arange(nu)
        # Structure first (data = positions), so that new values with the same pattern are a gather.
        pos = sparse.csr_array((np.arange(X.nnz, dtype=float), remap[X.indices], X.indptr), shape=(ns, nu))
        pos.sort_indices()
        self._perm_x = pos.data.astype(np.int64)  # Xc.data = X.data[_perm_x]
        C = pos.tocsc()
        C.sort_indices()
        self._perm_c = C.data.astype(np.int64)  # C.data = X.data[_perm_c]
        # Pair products P[(i, j), p] = X[p, i] X[p, j] for every pixel p shared by i and j.
        counts = np.diff(C.indptr)
        colidx = np.repeat(np.arange(nu), counts)
        n_e = counts[colidx]
        rep = np.repeat(np.arange(C.nnz), n_e)
        starts = np.cumsum(n_e) - n_e
        k = np.arange(rep.size) - np.repeat(starts, n_e)
        partner = C.indptr[colidx[rep]] + k
        pi_, pj_ = C.indices[rep].astype(np.int64), C.indices[partner].astype(np.int64)
        key = pi_ * ns + pj_
        ukey, pid = np.unique(key, return_inverse=True)
        Ppos = sparse.csr_array((np.arange(rep.size, dtype=float), (pid, colidx[rep])), shape=(ukey.size, nu))
        self._perm_p = Ppos.data.astype(np.int64)
        self._a = self._perm_c[rep][self._perm_p]  # P.data = X.data[_a] * X.data[_b]
        self._b = self._perm_c[partner][self._perm_p]
        self.Xc = pos
        self.P = Ppos
        self.refresh(X)
        self.pair_i, self.pair_j = ukey // ns, ukey % ns
        # Overlap graph and its connected components.
        G = sparse.csr_array((np.ones(ukey.size), (self.pair_i, self.pair_j)), shape=(ns, ns))
        self.n_groups, labels = connected_components(G, directed=False)
        self.labels = labels
        sizes = np.bincount(labels, minlength=self.n_groups)
        self.group_sizes = sizes
        order = np.argsort(labels, kind="stable")
        gstart = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        local = np.empty(ns, np.int64)
        local[order] = np.arange(ns) - gstart[labels[order]]
        self.classes = []
        pair_size = sizes[labels[self.pair_i]]
        for kk in np.unique(sizes):
            groups = np.flatnonzero(sizes == kk)
            gpos = np.full(self.n_groups, -1, np.int64)
            gpos[groups] = np.arange(groups.size)
            slots = gstart[groups][:, None] + np.arange(kk)[None, :]
            members = order[slots.ravel()].reshape(groups.size, kk)
            pidx = np.flatnonzero(pair_size == kk)
            self.classes.append(
                dict(
                    k=int(kk),
                    members=members,
                    pidx=pidx,
                    gpos=gpos[labels[self.pair_i[pidx]]],
                    li=local[self.pair_i[pidx]],
                    lj=local[self.pair_j[pidx]],
                )
            )

    def refresh(self, X: sparse.csr_array):
        """New model values with the same sparsity pattern (a new shape on the same geometry)."""
        X = sparse.csr_array(X)
        if not _same_pattern(self, X):
            raise ValueError("refresh needs the sparsity pattern the plan was built for")
        x = np.asarray(X.data, dtype=float)
        self.Xc = sparse.csr_array((x[self._perm_x], self.Xc.indices, self.Xc.indptr), shape=self.Xc.shape)
        self.P = sparse.csr_array(
            (x[self._a] * x[self._b], self.P.indices, self.P.indptr), shape=self.P.shape
        )
        self.row_sum = np.asarray(self.Xc.sum(axis=1)).ravel()
        return self

    def solve(self, F, W, mu, isig2, bg=None):
        """Solve a batch of frames.

        Parameters
        ----------
        F, W : numpy.ndarray
            (T, nu) data and inverse variances on the model pixels (W = 0 where bad, F = 0 there).
        mu, isig2 : numpy.ndarray
            (nsrc,) prior means and 1/sigma^2 (0: no prior).
        bg : tuple of numpy.ndarray, optional
            (s, c): per-frame sums of W and W*F over all good pixels of the frame, to fit a background.

        Returns
        -------
        w, var : numpy.ndarray
            (T, nsrc) posterior means and variances.
        bgw, bgvar : numpy.ndarray or None
            (T,) background and its variance.
        failed : numpy.ndarray of bool
            (T, nsrc) sources whose group system was singular.
        """
        T = F.shape[0]
        ns = self.nsrc
        b = (self.Xc @ (F * W).T).reshape(ns, T)
        Av = np.vstack([(self.P @ W.T).reshape(-1, T), np.zeros((1, T))])
        rhs = b + (mu * isig2)[:, None]
        u = (self.Xc @ W.T).reshape(ns, T) if bg is not None else None
        w0 = np.zeros((ns, T))
        var = np.zeros((ns, T))
        z = np.zeros((ns, T)) if bg is not None else None
        failed = np.zeros((ns, T), bool)
        for cl in self.classes:
            k, mem = cl["k"], cl["members"]
            ng = mem.shape[0]
            d = np.arange(k)
            step = max(1, _SOLVE_CHUNK // (ng * k * k))  # frames per pass: bounded memory for big groups
            for t0 in range(0, T, step):
                tt = slice(t0, min(T, t0 + step))
                nt = tt.stop - tt.start
                M = np.zeros((ng, nt, k, k))
                M[cl["gpos"], :, cl["li"], cl["lj"]] = Av[cl["pidx"], tt]
                M[:, :, d, d] += isig2[mem][:, None, :]
                dead = M[:, :, d, d] == 0  # no good pixel and no prior: decoupled, no information
                M[:, :, d, d] += dead
                R = np.moveaxis(rhs[mem, tt], 2, 1) * ~dead  # (ng, nt, k)
                try:
                    Minv = np.linalg.inv(M)
                    bad = ~np.isfinite(Minv).all(axis=(2, 3))
                except np.linalg.LinAlgError:
                    Minv, bad = _inv_each(M)
                out_w = np.einsum("gtij,gtj->gti", Minv, R)
                out_v = np.diagonal(Minv, axis1=2, axis2=3)
                w0[mem, tt] = np.moveaxis(out_w, 1, 2)
                var[mem, tt] = np.moveaxis(out_v, 1, 2)
                failed[mem, tt] = np.moveaxis(dead | bad[:, :, None], 1, 2)
                if bg is not None:
                    U = np.moveaxis(u[mem, tt], 2, 1) * ~dead
                    z[mem, tt] = np.moveaxis(np.einsum("gtij,gtj->gti", Minv, U), 1, 2)
        bgw = bgvar = None
        if bg is not None:
            s, c = bg
            denom = s - np.sum(u * z, axis=0)
            bgw = (c - np.sum(u * w0, axis=0)) / denom
            bgvar = 1.0 / denom
            w0 = w0 - z * bgw[None, :]
            var = var + z * z / denom[None, :]
        return w0.T, var.T, bgw, bgvar, failed.T


def _same_pattern(plan, X) -> bool:
    indptr, indices = plan._pattern
    return (
        X.indptr.shape == indptr.shape
        and X.indices.shape == indices.shape
        and np.array_equal(X.indptr, indptr)
        and np.array_equal(X.indices, indices)
    )


def _inv_each(M):
    """Invert a (g, t, k, k) stack one matrix at a time; singular ones become NaN."""
    out = np.full_like(M, np.nan)
    bad = np.zeros(M.shape[:2], bool)
    for g in range(M.shape[0]):
        for t in range(M.shape[1]):
            try:
                out[g, t] = np.linalg.inv(M[g, t])
            except np.linalg.LinAlgError:
                bad[g, t] = True
    return out, bad | ~np.isfinite(out).all(axis=(2, 3))


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class FitResult:
    """Fluxes of every source in a batch of frames.

    Attributes
    ----------
    flux, flux_err : numpy.ndarray
        (T, nsources) flux inside ``rmax`` and its error (data units); NaN where flagged.
    flag : numpy.ndarray
        (T, nsources) bit flags (:data:`FLAG_LOW_COVERAGE`, :data:`FLAG_SOLVE_FAILED`).
    good_fraction : numpy.ndarray
        (T, nsources) fraction of each source's model on good pixels of the frame.
    source_id : numpy.ndarray
        (nsources,) int64 source ids.
    background, background_err : numpy.ndarray or None
        (T,) fitted constant background and error (``fit_background``).
    model : numpy.ndarray or None
        (T, ny, nx) model image (``return_model=True``).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    flag: np.ndarray
    good_fraction: np.ndarray
    source_id: np.ndarray
    background: np.ndarray | None = None
    background_err: np.ndarray | None = None
    model: np.ndarray | None = None


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


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
def _wcs_key(wcs, shape) -> str:
    """Identity of a frame's pixel-to-sky mapping: the sky positions of a 9 x 9 grid of pixels.

    Numeric rather than the header text, so that WCS objects read from frames that differ only in time
    keywords (MJD-OBS, DATE-OBS, ...) share one geometry, mean model and solve plan.
    """
    ny, nx = (int(s) for s in shape)
    gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, 9), np.linspace(-0.5, ny - 0.5, 9))
    with np.errstate(invalid="ignore"):
        ra, dec = wcs.celestial.all_pix2world(gx.ravel(), gy.ravel(), 0)
    sky = np.round(np.concatenate([ra, dec]), 10)  # 1e-10 deg = 0.4 micro-arcsec
    return f"{ny}x{nx}|" + sky.tobytes().hex()


def _as_stack(a, name, dtype=None):
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(
            f"{name} must be an image (ny, nx) or a stack (nframes, ny, nx), got shape {a.shape}"
        )
    return a


class PRFModel:
    """A fitted PRF shape model for a field and the machinery to solve fluxes in any frame.

    Build with :meth:`build` (or :meth:`from_catalog`), fit frames with :meth:`fit`; serialise with
    :meth:`to_arrays` / :meth:`from_arrays` (or :meth:`save` / :meth:`load`) so that parallel tasks can
    each load the model and fit their own batch of frames.

    Parameters
    ----------
    shape : ShapeModel
    params : PRFParameters
    ra, dec, flux_estimate : numpy.ndarray
        Sources (degrees, catalog flux estimate).
    source_ids : numpy.ndarray
        int64 ids.
    wcs : astropy.wcs.WCS
        Reference WCS (the one of the shape-model reference image).
    image_shape : tuple of int
        (ny, nx).
    prior_mu, prior_sigma : numpy.ndarray
        Flux prior per source used by :meth:`fit` (``prior_sigma`` may be inf).
    """

    def __init__(
        self, shape, params, ra, dec, flux_estimate, source_ids, wcs, image_shape, prior_mu, prior_sigma
    ):
        self.shape = shape
        self.params = params
        self.ra = np.asarray(ra, dtype=float)
        self.dec = np.asarray(dec, dtype=float)
        self.flux_estimate = np.asarray(flux_estimate, dtype=float)
        self.source_ids = np.asarray(source_ids, dtype=np.int64)
        self.wcs = wcs
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.prior_mu = np.asarray(prior_mu, dtype=float)
        self.prior_sigma = np.asarray(prior_sigma, dtype=float)
        self.source_mask = None
        self.uncontaminated_source_mask = None
        self.shape_data = None  # subsample of the last shape fit's data, for plots
        self.diagnostics = {}
        self._cache = {}
        self._keys = {}

    @property
    def nsources(self) -> int:
        """Number of sources."""
        return self.ra.size

    # -- geometry and mean model for any WCS -------------------------------------------------------------
    def _entry(self, wcs=None, shape=None):
        wcs = self.wcs if wcs is None else wcs
        shape = self.image_shape if shape is None else tuple(int(x) for x in shape)
        memo = self._keys.get((id(wcs), shape))
        if memo is None or memo[0] is not wcs:
            memo = (wcs, _wcs_key(wcs, shape))  # holds the object, so its id cannot be reused
            self._keys[(id(wcs), shape)] = memo
        key = memo[1]
        ent = self._cache.pop(key, None)
        if ent is None:
            ent = {"wcs": wcs, "shape": shape, "key": key}
        self._cache[key] = ent  # most recently used last
        if len(self._cache) > _CACHE_SIZE:  # per-frame WCS lists: evict the oldest, keep the reference
            ref = self._keys.get((id(self.wcs), self.image_shape))
            for k in list(self._cache):
                if len(self._cache) <= _CACHE_SIZE:
                    break
                if k != key and (ref is None or k != ref[1]):
                    del self._cache[k]
            if len(self._keys) > 4 * _CACHE_SIZE:
                self._keys = {k: v for k, v in self._keys.items() if v[1] in self._cache}
        return ent

    def geometry(self, wcs=None, shape=None) -> Geometry:
        """Geometry of the sources on a frame with ``wcs`` (default: the reference WCS); cached.

        Parameters
        ----------
        wcs : astropy.wcs.WCS, optional
        shape : tuple of int, optional

        Returns
        -------
        Geometry
        """
        ent = self._entry(wcs, shape)
        if "geom" not in ent:
            ent["geom"] = build_geometry(
                ent["wcs"], ent["shape"], self.ra, self.dec, self.params.sparse_dist_lim
            )
        return ent["geom"]

    def model_for(self, wcs=None, shape=None) -> sparse.csr_array:
        """The normalised mean model (nsources x npixels) on a frame with ``wcs``; cached.

        Parameters
        ----------
        wcs : astropy.wcs.WCS, optional
        shape : tuple of int, optional

        Returns
        -------
        scipy.sparse.csr_array
        """
        ent = self._entry(wcs, shape)
        if "model" not in ent:
            g = self.geometry(wcs, shape)
            ent["model"] = _model_matrix(self.shape, g)
        return ent["model"]

    @property
    def mean_model(self) -> sparse.csr_array:
        """Normalised PRF of every source on the reference frame (nsources x npixels, CSR)."""
        return self.model_for()

    def _plan(self, wcs=None, shape=None) -> _Plan:
        ent = self._entry(wcs, shape)
        X = self.model_for(wcs, shape)
        plan = ent.get("plan")
        if plan is None or not _same_pattern(plan, X):
            plan = ent["plan"] = _Plan(X)
            ent["plan_for"] = X
        elif ent.get("plan_for") is not X:  # the shape changed, the geometry did not: new values only
            plan.refresh(X)
            ent["plan_for"] = X
        return plan

    # -- build ------------------------------------------------------------------------------------------
    @classmethod
    def from_catalog(cls, flux, flux_err, wcs, catalog, params=None, mask=None, catalog_path=None):
        """:meth:`build` with sources from a catalog table (SPEC 1.2/1.3).

        Parameters
        ----------
        flux, flux_err, wcs, params, mask
            As in :meth:`build`.
        catalog : astropy.table.Table or mapping
            Columns ``source_id``, ``ra``, ``dec`` and ``params.sources_flux_column``.
        catalog_path : str, optional
            The catalog's file, named in errors.

        Returns
        -------
        PRFModel
        """
        params = PRFParameters() if params is None else params
        names = catalog.colnames if hasattr(catalog, "colnames") else list(catalog)
        need = ["source_id", "ra", "dec", params.sources_flux_column]
        missing = [c for c in need if c not in names]
        if missing:
            raise BadInputError(
                catalog_path,
                f"catalog lacks column(s) {missing} needed for PRF photometry "
                f"(sources_flux_column={params.sources_flux_column!r})",
            )
        if len(catalog["ra"]) == 0:
            raise BadInputError(catalog_path, "catalog is empty")
        return cls.build(
            flux,
            flux_err,
            wcs,
            np.asarray(catalog["ra"]),
            np.asarray(catalog["dec"]),
            np.asarray(catalog[params.sources_flux_column]),
            source_ids=np.asarray(catalog["source_id"]),
            params=params,
            mask=mask,
        )

    @classmethod
    def build(
        cls,
        flux,
        flux_err,
        wcs,
        ra,
        dec,
        flux_estimate,
        source_ids=None,
        params=None,
        mask=None,
        gain=1.0,
        rdnoise=0.0,
    ):
        """Fit the shape model of a field on its frames (psfmachine's ``Machine`` + ``build_shape_model``).

        Parameters
        ----------
        flux : array_like
            (nframes, ny, nx) background-subtracted frames (or one (ny, nx) image), data units.
        flux_err : array_like or None
            Same shape; ``None``: :func:`default_error` with ``gain`` and ``rdnoise``.
        wcs : astropy.wcs.WCS or list of astropy.wcs.WCS
            One WCS for every frame, or one per frame.
        ra, dec : array_like
            Source positions (degrees); must be finite.
        flux_estimate : array_like
            Catalog flux estimate (data units) -- only seeds the masks and the first shape fit.
        source_ids : array_like, optional
            int64 ids (default 0..n-1).
        params : PRFParameters, optional
        mask : array_like of bool, optional
            Bad pixels (nonzero = bad), same shape as ``flux`` or one (ny, nx) mask for all frames.
        gain, rdnoise : float
            For the default error image.

        Returns
        -------
        PRFModel
        """
        params = PRFParameters() if params is None else params.validate()
        flux = _as_stack(flux, "flux")
        nt, ny, nx = flux.shape
        err = default_error(flux, gain, rdnoise) if flux_err is None else _as_stack(flux_err, "flux_err")
        if err.shape != flux.shape:
            raise ValueError(f"flux_err shape {err.shape} differs from flux shape {flux.shape}")
        mask = _mask_stack(mask, flux.shape)
        wcs_list = _wcs_list(wcs, nt)
        ra = np.atleast_1d(np.asarray(ra, dtype=float))
        dec = np.atleast_1d(np.asarray(dec, dtype=float))
        f0 = np.atleast_1d(np.asarray(flux_estimate, dtype=float))
        ns = ra.size
        if ns == 0:
            raise ValueError("no sources given")
        if dec.shape != ra.shape or f0.shape != ra.shape:
            raise ValueError(
                f"ra, dec and flux_estimate must have one entry per source ({ra.shape}, "
                f"{dec.shape}, {f0.shape})"
            )
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            nbad = int(np.sum(~(np.isfinite(ra) & np.isfinite(dec))))
            raise ValueError(f"{nbad} source(s) have non-finite ra/dec")
        sids = np.arange(ns, dtype=np.int64) if source_ids is None else np.asarray(source_ids)
        if sids.shape != ra.shape:
            raise ValueError("source_ids must have one entry per source")
        if sids.dtype.kind not in "iu":
            raise ValueError(f"source_ids must be integers, got dtype {sids.dtype}")
        sids = sids.astype(np.int64)
        if np.unique(sids).size != ns:
            raise ValueError("source_ids are not unique")
        for name in ("prior_mu", "prior_sigma"):
            v = getattr(params, name)
            if v is not None and np.ndim(v) == 1 and np.size(v) != ns:
                raise ValueError(f"PRF parameter {name} has {np.size(v)} entries for {ns} sources")
        tm = np.ones(nt, bool) if params.time_mask is None else np.asarray(params.time_mask, bool)
        if tm.shape != (nt,):
            raise ValueError(f"PRF parameter time_mask has {tm.size} entries for {nt} frames")
        if params.frame_index != "mean":
            fi = int(params.frame_index)
            if not -nt <= fi < nt:
                raise ValueError(f"PRF parameter frame_index={fi} is out of range for {nt} frames")
            if not tm[fi]:
                raise ValueError(f"PRF parameter frame_index={fi} is excluded by time_mask")

        epochs = _reference_epochs(flux, err, mask, wcs_list, tm, params.frame_index)
        ref_wcs = epochs[0]["wcs"]
        model = cls(
            ShapeModel(params.n_r_knots, params.n_phi_knots, params.rmin, params.rmax, params.cut_r),
            params,
            ra,
            dec,
            f0,
            sids,
            ref_wcs,
            (ny, nx),
            np.zeros(ns),
            np.full(ns, np.inf),
        )
        model._fit_shape(epochs)
        return model

    def _fit_shape(self, epochs):
        p = self.params
        sm = self.shape
        geoms = [self.geometry(e["wcs"]) for e in epochs]
        ref_err = epochs[0]["err"][epochs[0]["good"]]
        if p.flux_cut_off is not None:
            cut = float(p.flux_cut_off)
        else:
            cut = 3.0 * float(np.median(ref_err)) if ref_err.size else 0.0
        self.diagnostics["flux_cut_off"] = cut
        self.diagnostics["crowded_fallback"] = False
        F = np.where(np.isfinite(self.flux_estimate) & (self.flux_estimate > 0), self.flux_estimate, np.nan)
        prof_r, prof_v = _empirical_profile(geoms, epochs, F, p)
        self.diagnostics["empirical_profile"] = (prof_r, prof_v)
        # Prior on the shape weights: the empirical radial profile at each radial function's Greville point.
        grev = np.array([np.mean(sm.r_knots[j + 1 : j + 4]) for j in range(sm.n_radial)])
        lp = np.interp(grev, prof_r, np.log10(prof_v))
        w_prior = np.concatenate([lp[: sm.n_cut], np.repeat(lp[sm.n_cut :], sm.n_phi_knots)])
        mu_fit = err_fit = None
        for it in range(p.shape_iterations):
            data = []
            masks = []
            for ie, (e, g) in enumerate(zip(epochs, geoms, strict=True)):
                emp = F[g.src] * np.interp(g.r, prof_r, prof_v)
                if it == 0:
                    est = emp
                else:
                    mvals = _model_values(sm, g)
                    est = np.where(g.r <= sm.rmax, F[g.src] * mvals, emp)
                est = np.nan_to_num(est, nan=0.0)
                smask = est > cut
                count = np.bincount(g.pix[smask], minlength=g.npixels)
                unc = smask & (count[g.pix] == 1)
                masks.append((smask, unc))
                img, er, good = e["flux"].ravel(), e["err"].ravel(), e["good"].ravel()
                f = img[g.pix]
                # Selected on the masks (model estimates), never on the data: no selection bias.
                usable = (g.r <= sm.rmax) & good[g.pix] & (F[g.src] > 0)
                sel = unc & usable
                if p.crowded_dominance is not None and sel.sum() < 10 * sm.nbasis:
                    # Crowded: too few uncontaminated pixels. Use the pixels the source dominates
                    # (>= crowded_dominance of all sources' estimated flux there), with the other
                    # sources' estimated flux subtracted.
                    tot = np.bincount(g.pix, weights=est, minlength=g.npixels)[g.pix]
                    sel = smask & usable & (est >= p.crowded_dominance * tot)
                    f = f - (tot - est)
                    self.diagnostics["crowded_fallback"] = True
                q = f[sel] / F[g.src[sel]]
                sq = er[g.pix[sel]] / F[g.src[sel]]
                star = g.src[sel] + ie * self.nsources  # one log-flux offset per (epoch, source)
                data.append((g.r[sel], g.phi[sel], q, sq, g.xi[sel], g.eta[sel], star))
            r, phi, q, sq, xi, eta, src = (np.concatenate(a) for a in zip(*data, strict=True))
            if np.sum(q > 0) < sm.nbasis:
                raise ValueError(
                    f"only {np.sum(q > 0)} uncontaminated pixels to fit a shape model of "
                    f"{sm.nbasis} weights: lower flux_cut_off, fewer knots, or more/brighter "
                    "sources"
                )
            # The Gauss-Newton refinement only matters for the final shape (earlier ones only set masks).
            last = it == p.shape_iterations - 1
            keep = _fit_shape_weights(sm, r, phi, q, sq, src, w_prior, p, gn_steps=_GN_STEPS if last else 0)
            sm.normalise()
            for ent in self._cache.values():  # geometry and plan structure stay; model values change
                ent.pop("model", None)
            # Fluxes on the reference image with this shape (prior-free): next shape fit's F, and the prior.
            mu_fit, err_fit = self._solve_reference(epochs[0])
            ok = np.isfinite(mu_fit) & (mu_fit > 0)
            if ok.any():
                ratio = np.nanmedian(mu_fit[ok] / np.where(F[ok] > 0, F[ok], np.nan))
                F = np.where(ok, mu_fit, F * (ratio if np.isfinite(ratio) else 1.0))
        g0 = geoms[0]
        smask, unc = masks[0]
        self.source_mask = g0.matrix(True, smask).astype(bool)
        self.uncontaminated_source_mask = g0.matrix(True, unc).astype(bool)
        n_keep = keep.sum()
        sub = np.flatnonzero(keep & (q > 0))
        if sub.size > 50_000:
            sub = np.sort(np.random.default_rng(0).choice(sub, 50_000, replace=False))
        self.shape_data = {
            "r": r[sub],
            "phi": phi[sub],
            "y": np.log10(q[sub]),
            "xi": xi[sub],
            "eta": eta[sub],
        }
        self.diagnostics.update(n_shape_points=int(q.size), n_shape_kept=int(n_keep))
        # The flux prior.
        nref = epochs[0]["n_frames"]

        if p.prior_mu is not None:
            mu = np.broadcast_to(np.asarray(p.prior_mu, float), mu_fit.shape).copy()
        else:
            mu = mu_fit.copy()
        if p.prior_sigma is not None:
            sig = np.broadcast_to(np.asarray(p.prior_sigma, float), mu_fit.shape).copy()
        else:
            e1 = np.nan_to_num(err_fit, nan=0.0) * np.sqrt(nref)
            sig = p.prior_sigma_factor * np.sqrt(np.nan_to_num(mu, nan=0.0) ** 2 + e1**2)
            fin = np.isfinite(mu)
            wide = p.prior_sigma_factor * (np.max(np.abs(mu[fin])) if fin.any() else 1.0)
            sig = np.where(fin & (sig > 0), sig, wide if wide > 0 else 1.0)
        mu = np.where(np.isfinite(mu), mu, 0.0)
        self.prior_mu, self.prior_sigma = mu, sig
        self.diagnostics["reference_flux"] = mu_fit
        self.diagnostics["reference_flux_err"] = err_fit

    def _solve_reference(self, epoch):
        """Prior-free fit of the reference image (the mean frame)."""
        plan = self._plan(epoch["wcs"])
        img = epoch["flux"].ravel()[None, :]
        err = epoch["err"].ravel()[None, :]
        bad = ~epoch["good"].ravel()[None, :]
        res = self._solve_batch(
            plan, img, err, bad, np.zeros(self.nsources), np.zeros(self.nsources), self.params.fit_background
        )
        return res[0][0], res[1][0]

    # -- fit --------------------------------------------------------------------------------------------
    def _solve_batch(self, plan, F, E, M, mu, isig2, fit_bg):
        """Solve flattened frames (T, npix) on one plan; returns flux, err, flag, frac, bg, bgerr, w.

        ``M`` is the (T, npix) bad-pixel mask or None. Only the model pixels are touched unless a
        background is fitted (then every pixel enters the background sums). Everything is float64.
        """
        Fu, Wu, goodu = _gather(F, E, M, plan.pix_u)
        bg = None
        if fit_bg:
            s = np.zeros(F.shape[0])
            c = np.zeros(F.shape[0])
            for t in range(F.shape[0]):  # per frame: no (T, npix) float64 temporaries
                _, wt, _ = _gather(F[t : t + 1], E[t : t + 1], None if M is None else M[t : t + 1], None)
                ft = np.where(wt[0] > 0, F[t], 0.0).astype(float)
                s[t], c[t] = wt.sum(), float(wt[0] @ ft)
            bg = (s, c)
        w, var, bgw, bgvar, failed = plan.solve(Fu, Wu, mu, isig2, bg)
        frac = (plan.Xc @ goodu.T.astype(float)).T
        flag = np.zeros(w.shape, np.int16)
        low = frac < self.params.min_good_fraction
        flag[low] |= FLAG_LOW_COVERAGE
        bad = failed | ~np.isfinite(w) | ~(var >= 0)
        flag[bad & ~low] |= FLAG_SOLVE_FAILED
        out = np.where(flag == 0, w, np.nan)
        out_err = np.where(flag == 0, np.sqrt(np.where(var >= 0, var, np.nan)), np.nan)
        bge = np.sqrt(bgvar) if bgvar is not None else None
        return out, out_err, flag, frac, bgw, bge, w

    def fit(
        self,
        flux,
        flux_err=None,
        mask=None,
        wcs=None,
        return_model=False,
        gain=1.0,
        rdnoise=0.0,
        prior_mu=None,
        prior_sigma=None,
    ) -> FitResult:
        """Fluxes of every source in every frame of a batch (psfmachine's ``fit_model``), exactly per frame.

        Each frame is solved on its own (results do not depend on how frames are batched):
        ``(X^T C^-1 X + diag(1/sigma^2)) w = X^T C^-1 f + mu/sigma^2`` with ``X`` the normalised mean model on
        the frame's WCS, per connected group of overlapping sources, all frames of the batch at once.
        Bad pixels (``mask``, non-finite flux or error, error <= 0) take part in no fit. The solution of a
        source with less than ``min_good_fraction`` of its model on good pixels is reported NaN with
        :data:`FLAG_LOW_COVERAGE` (it stays in its group's system, so its light is still modelled for its
        neighbours). With ``params.fit_background`` a constant background per frame is fitted (flat prior,
        from every good pixel of the frame) and eliminated exactly (Schur complement). The cost per frame
        grows with the sum over groups of (group size)^3: a field so crowded that every source overlaps
        into one component degenerates to psfmachine's dense solve (then solved a few frames at a time,
        in bounded memory).

        Parameters
        ----------
        flux : array_like
            (T, ny, nx) frames or one (ny, nx) image, data units, background-subtracted.
        flux_err : array_like, optional
            Same shape; ``None``: :func:`default_error` with ``gain``, ``rdnoise``.
        mask : array_like of bool, optional
            Bad pixels, (T, ny, nx) or (ny, nx).
        wcs : astropy.wcs.WCS or list of astropy.wcs.WCS, optional
            The frames' WCS (one, or one per frame); default: the reference WCS.
        return_model : bool
            Also return the (T, ny, nx) model image.
        gain, rdnoise : float
            For the default error image.
        prior_mu, prior_sigma : array_like, optional
            Override the stored prior (per source, scalars broadcast; ``prior_sigma`` may be inf).

        Returns
        -------
        FitResult
        """
        flux = _as_stack(flux, "flux")
        T, ny, nx = flux.shape
        err = default_error(flux, gain, rdnoise) if flux_err is None else _as_stack(flux_err, "flux_err")
        if err.shape != flux.shape:
            raise ValueError(f"flux_err shape {err.shape} differs from flux shape {flux.shape}")
        mask = _mask_stack(mask, flux.shape)
        wcs_list = _wcs_list(self.wcs if wcs is None else wcs, T)
        mu = np.broadcast_to(
            np.asarray(self.prior_mu if prior_mu is None else prior_mu, float), (self.nsources,)
        )
        sig = np.broadcast_to(
            np.asarray(self.prior_sigma if prior_sigma is None else prior_sigma, float), (self.nsources,)
        )
        if not (np.all(np.isfinite(mu)) and np.all(sig > 0)):
            raise ValueError("prior_mu must be finite and prior_sigma > 0")
        isig2 = 1.0 / sig**2
        ns = self.nsources
        out = {k: np.full((T, ns), np.nan) for k in ("flux", "flux_err", "frac")}
        flag = np.zeros((T, ns), np.int16)
        fit_bg = bool(self.params.fit_background)
        bgv = np.full(T, np.nan) if fit_bg else None
        bge = np.full(T, np.nan) if fit_bg else None
        model = np.zeros((T, ny, nx)) if return_model else None
        # Frames sharing a WCS share a plan (keys computed once per distinct WCS object).
        by_id = {}
        keys = [by_id.setdefault(id(w), self._entry(w, (ny, nx))["key"]) for w in wcs_list]
        flat_f, flat_e = flux.reshape(T, -1), err.reshape(T, -1)
        flat_m = None if mask is None else mask.reshape(T, -1)
        for key in dict.fromkeys(keys):
            idx = np.array([t for t, k in enumerate(keys) if k == key])
            w0 = wcs_list[idx[0]]
            plan = self._plan(w0, (ny, nx))
            whole = idx.size == T  # every frame: views, no copy of the full frames
            F = flat_f if whole else flat_f[idx]
            E = flat_e if whole else flat_e[idx]
            M = None if flat_m is None else (flat_m if whole else flat_m[idx])
            f, fe, fl, frac, b, be, wraw = self._solve_batch(plan, F, E, M, mu, isig2, fit_bg)
            out["flux"][idx], out["flux_err"][idx], out["frac"][idx], flag[idx] = f, fe, frac, fl
            if fit_bg:
                bgv[idx], bge[idx] = b, be
            if return_model:
                m = np.zeros((idx.size, ny * nx))
                m[:, plan.pix_u] = (plan.Xc.T @ np.nan_to_num(wraw).T).T
                if fit_bg:
                    m += b[:, None]
                model[idx] = m.reshape(idx.size, ny, nx)
        return FitResult(
            flux=out["flux"],
            flux_err=out["flux_err"],
            flag=flag,
            good_fraction=out["frac"],
            source_id=self.source_ids.copy(),
            background=bgv,
            background_err=bge,
            model=model,
        )

    # -- diagnostics ------------------------------------------------------------------------------------
    def get_psf_metrics(self, wcs=None, shape=None) -> PSFMetrics:
        """Model diagnostics (psfmachine's ``get_psf_metrics``).

        ``source_psf_fraction``: the fraction of each source's model flux (its flux inside ``rmax``) that
        lands on the frame's pixels: ``sum_p PRF(offset_p) * a_p`` over the frame pixels, where ``a_p`` is
        the fraction of pixel ``p`` inside the disc ``r <= rmax``, from ``psf_subsample`` x ``psf_subsample``
        sub-pixel samples (tangent-plane offsets from the local WCS Jacobian). The sub-pixel sampling
        removes the pixelisation of the disc edge that a plain row sum of ``mean_model`` (pixel centres
        inside the disc) has, so a star fully on the frame gets 1 to ~1e-4; the PRF itself is already
        pixel-integrated, so it is not sub-sampled again (that would blur the frame edge by a pixel). No
        time model is built, so ``perturbed_ratio_mean`` and ``perturbed_std`` are ``None``.

        Parameters
        ----------
        wcs : astropy.wcs.WCS, optional
            Frame WCS (default: the reference WCS).
        shape : tuple of int, optional

        Returns
        -------
        PSFMetrics
        """
        g = self.geometry(wcs, shape)
        sm = self.shape
        n = self.params.psf_subsample
        s = (np.arange(n) + 0.5) / n - 0.5
        sy, sx = np.meshgrid(s, s, indexing="ij")
        sx, sy = sx.ravel(), sy.ravel()
        half_diag = np.sqrt(np.sum(g.jac**2, axis=(1, 2)) / 2)  # arcsec, half the pixel diagonal (approx.)
        near = g.r <= sm.rmax + 1.01 * half_diag[g.src]
        src = g.src[near]
        J = g.jac[src]
        inside = np.zeros(src.size)
        for k in range(sx.size):  # n^2 sub-pixel offsets, each vectorised over all pairs
            xi = g.xi[near] + J[:, 0, 0] * sx[k] + J[:, 0, 1] * sy[k]
            eta = g.eta[near] + J[:, 1, 0] * sx[k] + J[:, 1, 1] * sy[k]
            inside += np.hypot(xi, eta) <= sm.rmax
        inside /= sx.size
        # PRF at the pixel centre; centres just beyond rmax (pixels straddling the edge) use r = rmax.
        val = 10.0 ** sm.log_value(np.minimum(g.r[near], sm.rmax), g.phi[near]) / sm.norm * g.area[src]
        frac = np.bincount(src, weights=val * inside, minlength=self.nsources)
        return PSFMetrics(source_psf_fraction=frac, notes={"time_model": "none: perturbed_* not computed"})

    def plot_shape_model(self, path, dpi=110):
        """Write a PNG of the shape-fit data, the model and their difference, in (r, phi) and on the sky.

        Uses matplotlib's object API with the Agg canvas (no pyplot, no change of the global backend).

        Parameters
        ----------
        path : str or os.PathLike
            Output PNG.
        dpi : int

        Returns
        -------
        str
            The path written.
        """
        from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend change

        d = self.shape_data
        if d is None or d["r"].size == 0:
            raise ValueError("no shape-fit data to plot (build the model first)")
        sm = self.shape
        # Normalised model: log10 of the fraction of the source flux (inside rmax) in a pixel.
        lognorm = np.log10(proj_plane_pixel_area(self.wcs.celestial) * 3600.0**2 / sm.norm)
        model_y = sm.log_value(d["r"], d["phi"]) + lognorm
        resid = d["y"] - model_y
        vmin, vmax = np.percentile(d["y"], [2, 99.8])
        rlim = max(float(np.percentile(np.abs(resid), 95)), 1e-3)
        fig = Figure(figsize=(15, 9), constrained_layout=True)
        axes = fig.subplots(2, 3)
        kw = dict(s=2, cmap="viridis", vmin=vmin, vmax=vmax, rasterized=True)
        kr = dict(s=2, cmap="RdBu_r", vmin=-rlim, vmax=rlim, rasterized=True)
        deg = np.rad2deg(d["phi"])
        sky = dict(xlabel="xi (east) [arcsec]", ylabel="eta (north) [arcsec]", aspect="equal")
        polar = dict(xlabel="r [arcsec]", ylabel="phi [deg]")
        axes[0, 0].scatter(d["r"], deg, c=d["y"], **kw)
        axes[0, 0].set(title="data: log10(pixel flux / source flux)", **polar)
        im = axes[0, 1].scatter(d["r"], deg, c=model_y, **kw)
        axes[0, 1].set(title=f'model (normalised over r <= {sm.rmax:g}")', **polar)
        imr = axes[0, 2].scatter(d["r"], deg, c=resid, **kr)
        axes[0, 2].set(title="data - model [dex]", **polar)
        axes[1, 0].scatter(d["xi"], d["eta"], c=d["y"], **kw)
        axes[1, 0].set(title="data on the sky", **sky)
        g = np.linspace(-sm.rmax, sm.rmax, 201)
        gx, gy = np.meshgrid(g, g)
        mv = sm.log_value(np.hypot(gx, gy), np.arctan2(gy, gx)) + lognorm
        axes[1, 1].pcolormesh(
            gx, gy, mv, cmap="viridis", vmin=vmin, vmax=vmax, shading="auto", rasterized=True
        )
        axes[1, 1].set(title="model on the sky", **sky)
        axes[1, 2].scatter(d["xi"], d["eta"], c=resid, **kr)
        axes[1, 2].set(title="data - model on the sky [dex]", **sky)
        fig.colorbar(im, ax=axes[:, :2], shrink=0.6, label="log10(pixel flux / source flux in rmax)")
        fig.colorbar(imr, ax=axes[:, 2], shrink=0.6, label="residual [dex]")
        path = os.fspath(path)
        fig.savefig(path, dpi=dpi)
        return path

    # -- serialisation ----------------------------------------------------------------------------------
    def to_arrays(self) -> dict:
        """Everything needed to fit frames elsewhere, as a dict of numpy arrays (``np.savez`` ready).

        Holds the parameters (JSON), the shape weights and normalisation, the sources, the prior, the
        reference WCS (header text), the reference ``mean_model`` (CSR arrays) and the masks.

        Returns
        -------
        dict of numpy.ndarray
        """
        mm = self.mean_model
        out = {
            "format_version": np.array(_FORMAT_VERSION),
            "params_json": np.array(json.dumps(self.params.to_dict())),
            "shape_weights": self.shape.weights,
            "shape_norm": np.array(self.shape.norm),
            "ra": self.ra,
            "dec": self.dec,
            "flux_estimate": self.flux_estimate,
            "source_id": self.source_ids,
            "prior_mu": self.prior_mu,
            "prior_sigma": self.prior_sigma,
            "wcs_header": np.array(self.wcs.to_header_string(relax=True)),
            "image_shape": np.array(self.image_shape, dtype=np.int64),
            "mean_model_data": mm.data,
            "mean_model_indices": mm.indices.astype(np.int64),
            "mean_model_indptr": mm.indptr.astype(np.int64),
        }
        for name in ("source_mask", "uncontaminated_source_mask"):
            m = getattr(self, name)
            if m is not None:
                out[f"{name}_indices"] = m.indices.astype(np.int64)
                out[f"{name}_indptr"] = m.indptr.astype(np.int64)
        if self.shape_data is not None:
            for k, v in self.shape_data.items():
                out[f"shape_data_{k}"] = v
        return out

    @classmethod
    def from_arrays(cls, arrays) -> PRFModel:
        """Rebuild a model from :meth:`to_arrays` output (no refit; the mean model is reused as stored).

        Parameters
        ----------
        arrays : mapping of numpy.ndarray
            E.g. an ``np.load`` result.

        Returns
        -------
        PRFModel
        """
        a = {k: np.asarray(arrays[k]) for k in arrays}
        if int(a.get("format_version", -1)) != _FORMAT_VERSION:
            raise ValueError(f"PRF model format version {a.get('format_version')} is not {_FORMAT_VERSION}")
        params = PRFParameters.from_dict(json.loads(str(a["params_json"])))
        sm = ShapeModel(params.n_r_knots, params.n_phi_knots, params.rmin, params.rmax, params.cut_r)
        sm.weights = a["shape_weights"].astype(float)
        sm.norm = float(a["shape_norm"])
        wcs = WCS(fits.Header.fromstring(str(a["wcs_header"])))
        shape = tuple(int(s) for s in a["image_shape"])
        m = cls(
            sm,
            params,
            a["ra"],
            a["dec"],
            a["flux_estimate"],
            a["source_id"],
            wcs,
            shape,
            a["prior_mu"],
            a["prior_sigma"],
        )
        ns, npix = m.nsources, shape[0] * shape[1]
        mm = sparse.csr_array(
            (a["mean_model_data"], a["mean_model_indices"], a["mean_model_indptr"]), shape=(ns, npix)
        )
        m._entry()["model"] = mm
        for name in ("source_mask", "uncontaminated_source_mask"):
            if f"{name}_indices" in a:
                idx = a[f"{name}_indices"]
                setattr(
                    m,
                    name,
                    sparse.csr_array((np.ones(idx.size, bool), idx, a[f"{name}_indptr"]), shape=(ns, npix)),
                )
        if "shape_data_r" in a:
            m.shape_data = {k: a[f"shape_data_{k}"] for k in ("r", "phi", "y", "xi", "eta")}
        return m

    def save(self, path):
        """Save :meth:`to_arrays` to a ``.npz`` file (no pickles).

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        str
        """
        path = os.fspath(path)
        np.savez_compressed(path, **self.to_arrays())
        return path if path.endswith(".npz") else path + ".npz"

    @classmethod
    def load(cls, path) -> PRFModel:
        """Load a model written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        PRFModel
        """
        try:
            with np.load(os.fspath(path), allow_pickle=False) as z:
                return cls.from_arrays({k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError) as exc:
            raise BadInputError(path, f"not a readable PRF model file ({exc})") from exc


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _model_values(sm: ShapeModel, g: Geometry):
    """Normalised PRF (fraction of the source flux inside rmax) at every geometry pair; 0 beyond rmax."""
    out = np.zeros(g.r.size)
    inside = g.r <= sm.rmax
    if inside.any():
        s = sm.design(g.r[inside], g.phi[inside]) @ sm.weights
        out[inside] = 10.0**s / sm.norm * g.area[g.src[inside]]
    return out


def _model_matrix(sm: ShapeModel, g: Geometry) -> sparse.csr_array:
    vals = _model_values(sm, g)
    return g.matrix(vals, g.r <= sm.rmax)


def _gather(F, E, M, pix):
    """Data, inverse variances (0 on bad pixels) and the good map at ``pix`` (all if None), in float64."""
    if pix is not None:
        F, E = F[:, pix], E[:, pix]
        M = None if M is None else M[:, pix]
    F = np.asarray(F, dtype=float)
    E = np.asarray(E, dtype=float)
    good = np.isfinite(F) & np.isfinite(E) & (E > 0)
    if M is not None:
        good &= ~M
    with np.errstate(divide="ignore", invalid="ignore"):
        W = np.where(good, 1.0 / (E * E), 0.0)
    return np.where(good, F, 0.0), W, good


def _mask_stack(mask, shape):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 2:
        m = np.broadcast_to(m, shape)
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} does not match the frames {shape}")
    return m != 0


def _wcs_list(wcs, nt):
    if isinstance(wcs, list | tuple):
        if len(wcs) != nt:
            raise ValueError(f"{len(wcs)} WCS given for {nt} frames")
        out = list(wcs)
    else:
        out = [wcs] * nt
    for w in out:
        if not isinstance(w, WCS) or not w.has_celestial:
            raise ValueError("every frame needs a celestial astropy.wcs.WCS")
    return out


def _reference_epochs(flux, err, mask, wcs_list, tm, frame_index):
    """Reference image(s) for the shape model: one frame, or the mean of the selected frames per WCS."""
    nt, ny, nx = flux.shape
    if frame_index != "mean":
        t = int(frame_index) % nt
        good = np.isfinite(flux[t]) & np.isfinite(err[t]) & (err[t] > 0)
        if mask is not None:
            good &= ~mask[t]
        return [
            {
                "wcs": wcs_list[t],
                "flux": np.where(good, flux[t], 0.0).astype(float),
                "err": np.where(good, err[t], np.inf).astype(float),
                "good": good,
                "n_frames": 1,
            }
        ]
    keys = [_wcs_key(w, (ny, nx)) for w in wcs_list]
    epochs = []
    for key in dict.fromkeys(keys[t] for t in range(nt) if tm[t]):
        idx = [t for t in range(nt) if tm[t] and keys[t] == key]
        s = np.zeros((ny, nx))
        v = np.zeros((ny, nx))
        n = np.zeros((ny, nx))
        for t in idx:  # a running sum: no (nframes, ny, nx) float64 copy
            good = np.isfinite(flux[t]) & np.isfinite(err[t]) & (err[t] > 0)
            if mask is not None:
                good &= ~mask[t]
            s += np.where(good, flux[t], 0.0)
            v += np.where(good, np.asarray(err[t], float) ** 2, 0.0)
            n += good
        good = n > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            epochs.append(
                {
                    "wcs": wcs_list[idx[0]],
                    "flux": np.where(good, s / np.maximum(n, 1), 0.0),
                    "err": np.where(good, np.sqrt(v) / np.maximum(n, 1), np.inf),
                    "good": good,
                    "n_frames": len(idx),
                }
            )
    # The epoch with the most frames is the reference (its WCS becomes the model's reference WCS).
    epochs.sort(key=lambda e: -e["n_frames"])
    return epochs


def _empirical_profile(geoms, epochs, F, p):
    """Seed radial profile: weighted median of data / flux-estimate in radial bins (monotone, positive).

    Each (source, pixel) ratio is weighted by its inverse variance ``(F / err)^2``, so bright stars set
    the far wing (where faint stars only add noise); the median resists contamination by neighbours.
    Used for the first masks and as the mean of the shape-weight prior.
    """
    nb = 4 * p.n_r_knots
    edges = np.linspace(0.0, np.sqrt(p.sparse_dist_lim), nb + 1) ** 2
    rs, vs, ws = [], [], []
    for e, g in zip(epochs, geoms, strict=True):
        good = e["good"].ravel()[g.pix] & np.isfinite(F[g.src]) & (F[g.src] > 0)
        fs = F[g.src[good]]
        rs.append(g.r[good])
        vs.append(e["flux"].ravel()[g.pix[good]] / fs)
        ws.append((fs / e["err"].ravel()[g.pix[good]]) ** 2)
    r, v, wt = np.concatenate(rs), np.concatenate(vs), np.concatenate(ws)
    if r.size > 400_000:  # a seed profile: a fixed random subset is plenty (and keeps the sort cheap)
        sub = np.random.default_rng(12345).choice(r.size, 400_000, replace=False)
        r, v, wt = r[sub], v[sub], wt[sub]
    b = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, nb - 1)
    order = np.lexsort((v, b))
    b, v, r, wt = b[order], v[order], r[order], wt[order]
    counts = np.bincount(b, minlength=nb)
    has = counts > 0
    # Weighted median per bin: first value where the within-bin cumulative weight reaches half the total.
    tot = np.bincount(b, weights=wt, minlength=nb)
    cum = np.cumsum(wt)
    before = np.concatenate([[0.0], np.cumsum(tot)[:-1]])
    within = cum - before[b]
    reached = within >= 0.5 * tot[b]
    first = np.full(nb, -1, np.int64)
    idx = np.flatnonzero(reached)
    first[b[idx[::-1]]] = idx[::-1]  # the first (lowest) index per bin wins
    has &= first >= 0
    med = v[first[has]]
    rmed = (np.bincount(b, weights=r, minlength=nb)[has]) / counts[has]
    if not np.any(med > 0):
        raise ValueError(
            "no positive flux around the sources: cannot seed the PRF model (are the positions, "
            "the WCS and the flux estimates right?)"
        )
    med = np.fmin.accumulate(np.where(med > 0, med, np.nan))
    med = np.where(np.isfinite(med), med, np.nanmax(med))  # leading non-positive bins: take the peak
    floor = np.max(med) * 1e-7
    return rmed, np.maximum(med, floor)


_GN_STEPS = 2  # Gauss-Newton refinements of the shape fit in linear flux space


def _fit_shape_weights(sm: ShapeModel, r, phi, q, sq, src, w_prior, p, gn_steps=_GN_STEPS):
    """Fit the shape weights to the flux ratios ``q = f / F`` (errors ``sq``) of the selected pixels.

    Model of a point of star ``i``: ``q = 10**(S(r, phi) + c_i)``. The free log-flux offset ``c_i`` per
    star absorbs the error of its flux estimate, so the shape is not distorted where one bright star
    dominates the data; the offsets are eliminated exactly (their normal block is diagonal: a Schur
    complement), so the cost does not grow with the square of the number of stars. The constant shared
    by ``S`` and every ``c_i`` is set by the weight prior and cancels in the normalisation.

    1. A log-space fit (``log10 q`` of the positive points, weights ``(q ln10 / sq)^2``) with iterative
       robust clipping.
    2. ``gn_steps`` Gauss-Newton steps in linear space: with ``m`` the current model, the working data
       ``log10 m + (q - m) / (m ln10)`` with weights ``(m ln10 / sq)^2`` -- no logarithm of noisy data and
       every point (also ``q <= 0``) used, so faint wing pixels are not biased -- each after one clipping
       update on the linear residuals ``(q - m) / sq``.

    With ``bin_data`` the normal equations are formed on the binned working data (the offsets, which
    cannot be profiled inside bins, are alternated with the shape three times per solve); clipping acts on
    the individual points.

    Returns
    -------
    numpy.ndarray of bool
        The points kept by the final clipping.
    """
    n = q.size
    nstar = int(src.max()) + 1 if n else 0
    valid = np.isfinite(q) & np.isfinite(sq) & (sq > 0)
    ln10 = np.log(10.0)
    A = _Blocks(sm, r, phi)
    # Prior precision: independent Gaussians on every weight (about the empirical profile) plus a
    # smoothness term on the differences of neighbouring angular weights of each radial function.
    prior_prec = np.diag(np.full(sm.nbasis, 1.0 / p.shape_prior_sigma**2))
    if p.shape_phi_smooth is not None:
        Dm = _phi_difference_operator(sm)
        prior_prec += (Dm.T @ Dm).toarray() / p.shape_phi_smooth**2
    prior_rhs = prior_prec @ w_prior
    nb = p.n_bins
    if nb:
        rb = np.minimum((np.sqrt(np.asarray(r) / sm.rmax) * nb).astype(np.int64), nb - 1)
        ph = np.mod(phi, 2 * np.pi)
        cell = rb * nb + np.minimum((ph / (2 * np.pi) * nb).astype(np.int64), nb - 1)
    c = np.zeros(nstar)
    w = w_prior.copy()

    def solve(y, ivar, keep, c):
        if not nb:
            return _profiled_solve(A, y, np.where(keep, ivar, 0.0), src, nstar, prior_prec, prior_rhs)
        wt = np.where(keep, ivar, 0.0)
        for _ in range(3):
            yc = y - np.nan_to_num(c[src])
            sw = np.bincount(cell, weights=wt, minlength=nb * nb)
            has = sw > 0
            rbin = np.bincount(cell, weights=wt * r, minlength=nb * nb)[has] / sw[has]
            pbin = np.bincount(cell, weights=wt * ph, minlength=nb * nb)[has] / sw[has]
            ybin = np.bincount(cell, weights=wt * np.nan_to_num(yc), minlength=nb * nb)[has] / sw[has]
            M, rhs = _Blocks(sm, rbin, pbin).gram(sw[has], ybin)
            w = _spd_solve(M + prior_prec, rhs + prior_rhs)
            res = np.nan_to_num(y - A @ w)
            sws = np.bincount(src, weights=wt, minlength=nstar)
            c = np.where(
                sws > 0,
                np.bincount(src, weights=wt * res, minlength=nstar) / np.where(sws > 0, sws, 1.0),
                np.nan,
            )
        return w, c

    def clip(z, keep_from):
        zk = z[keep_from]
        if zk.size == 0:
            return keep_from
        med = np.median(zk)
        scale = 1.4826 * np.median(np.abs(zk - med))
        if not scale > 0:
            return keep_from
        return keep_from & (np.abs(z - med) <= p.clip_sigma * scale)

    # 1. log space, positive points
    pos = valid & (q > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(pos, np.log10(np.where(pos, q, 1.0)), 0.0)
        ivar = np.where(pos, (q * ln10 / sq) ** 2, 0.0)
    keep = pos.copy()
    for it in range(p.clip_iterations + 1):
        w, c = solve(y, ivar, keep, c)
        if it == p.clip_iterations:
            break
        z = np.sqrt(ivar) * (y - A @ w - np.nan_to_num(c[src]))
        new = clip(z, pos)
        if np.array_equal(new, keep):
            break
        keep = new
    # 2. Gauss-Newton in linear space, every valid point
    for _ in range(gn_steps):
        with np.errstate(over="ignore", invalid="ignore"):
            s_ = A @ w + c[src]
            m = 10.0**s_
        ok = valid & np.isfinite(m) & (m > 0)
        zlin = np.where(ok, (q - np.where(ok, m, 0.0)) / sq, 0.0)
        keep = clip(zlin, ok) if p.clip_iterations else ok
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(ok, s_ + (q - m) / (m * ln10), 0.0)
            ivar = np.where(ok, (m * ln10 / sq) ** 2, 0.0)
        w, c = solve(y, ivar, keep, c)
    sm.weights = w
    return keep


def _phi_difference_operator(sm: ShapeModel) -> sparse.csr_array:
    """Periodic first differences of the angular weights of every phi-dependent radial function."""
    nphi = sm.n_phi_knots
    blocks = sm.n_radial - sm.n_cut
    base = sm.n_cut + nphi * np.repeat(np.arange(blocks), nphi)
    m = np.tile(np.arange(nphi), blocks)
    rows = np.arange(blocks * nphi)
    return sparse.csr_array(
        (
            np.concatenate([np.ones(rows.size), -np.ones(rows.size)]),
            (np.concatenate([rows, rows]), np.concatenate([base + m, base + (m + 1) % nphi])),
        ),
        shape=(rows.size, sm.nbasis),
    )


class _Blocks:
    """A shape design matrix as dense (n, 16) row blocks, for fast normal equations.

    Each row of the design has 4 radial x 4 angular B-spline slots; rows whose slots start at the same
    (radial, angular) knot interval share all 16 columns (a "cell"). The Gram matrix ``A^T W A`` is then a
    sum over at most ``n_radial x n_phi_knots`` cells of small dense ``V^T W V`` products (BLAS), added at
    the cell's columns -- several times faster than a general sparse-sparse product. Phi-free radial
    functions appear as 4 slots with the same column (their values sum to the radial value), which the
    scatter-add merges.
    """

    def __init__(self, sm: ShapeModel, r, phi):
        r = np.asarray(r, dtype=float).ravel()
        n = r.size
        self.n, self.nbasis = n, sm.nbasis
        rc, rv = _row_block(sm.radial_design(r), n)
        pc, pv = _row_block(sm.angular_design(np.asarray(phi, dtype=float).ravel()), n)
        free = rc < sm.n_cut
        cols = sm.n_cut + (rc[:, :, None] - sm.n_cut) * sm.n_phi_knots + pc[:, None, :]
        self.cols = np.where(free[:, :, None], rc[:, :, None], cols).reshape(n, 16)
        self.vals = (rv[:, :, None] * pv[:, None, :]).reshape(n, 16)
        cell = rc[:, 0] * sm.n_phi_knots + pc[:, 0]
        order = np.argsort(cell, kind="stable")
        cs = cell[order]
        starts = np.flatnonzero(np.concatenate([[True], cs[1:] != cs[:-1]])) if n else np.zeros(0, np.int64)
        first = order[starts]
        # Every row of a cell must have the cell's columns (true for scipy's layout; checked).
        cell_of_row = np.repeat(np.arange(starts.size), np.diff(np.concatenate([starts, [n]])))
        if n and not np.array_equal(self.cols[order], self.cols[first][cell_of_row]):
            _, inv = np.unique(self.cols, axis=0, return_inverse=True)
            order = np.argsort(inv.ravel(), kind="stable")
            ci = inv.ravel()[order]
            starts = np.flatnonzero(np.concatenate([[True], ci[1:] != ci[:-1]]))
            first = order[starts]
        self.order = order
        self.bounds = np.concatenate([starts, [n]]).astype(np.int64)
        self.cell_cols = self.cols[first]
        self.vals_sorted = self.vals[order]

    def gram(self, ivar, y):
        """``A^T W A`` (dense) and ``A^T W y`` for weights ``ivar``."""
        M = np.zeros((self.nbasis, self.nbasis))
        rhs = np.zeros(self.nbasis)
        ws = np.asarray(ivar, dtype=float)[self.order]
        wy = ws * np.asarray(y, dtype=float)[self.order]
        for k in range(self.cell_cols.shape[0]):
            a, b = self.bounds[k], self.bounds[k + 1]
            V = self.vals_sorted[a:b]
            G = V.T @ (V * ws[a:b, None])
            c = self.cell_cols[k]
            np.add.at(M, (c[:, None], c[None, :]), G)
            np.add.at(rhs, c, V.T @ wy[a:b])
        return M, rhs

    def star_matrix(self, ivar, src, nstar):
        """``B[i, k] = sum over star i's points of ivar * A[., k]`` (dense, nstar x nbasis)."""
        data = (self.vals * np.asarray(ivar, dtype=float)[:, None]).ravel()
        rows = np.repeat(np.asarray(src), 16)
        return sparse.coo_array((data, (rows, self.cols.ravel())), shape=(nstar, self.nbasis)).toarray()

    def __matmul__(self, w):
        return np.sum(self.vals * np.asarray(w)[self.cols], axis=1)


def _spd_solve(M, b):
    """Solve a symmetric positive definite system (Cholesky; least squares if it is not SPD)."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(M, check_finite=False), b, check_finite=False)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(M, b, rcond=None)[0]


def _profiled_solve(A, y, ivar, src, nstar, prior_prec, prior_rhs):
    """Weighted least squares for shape weights and per-star offsets, offsets eliminated (Schur)."""
    M, rhs = A.gram(ivar, y)
    M += prior_prec
    rhs += prior_rhs
    B = A.star_matrix(ivar, src, nstar)
    D = np.bincount(src, weights=ivar, minlength=nstar)
    rc = np.bincount(src, weights=ivar * y, minlength=nstar)
    Dinv = np.where(D > 0, 1.0 / np.where(D > 0, D, 1.0), 0.0)
    M -= (B * Dinv[:, None]).T @ B
    w = _spd_solve(M, rhs - B.T @ (Dinv * rc))
    c = np.where(D > 0, (rc - B @ w) * Dinv, np.nan)
    return w, c
