"""The PRF time model, part 2 (SPEC 6): a multiplicative perturbation of the PRF for shape changes (focus).

Part 1 (:mod:`.timemodel`) moves the sources (drift, plate scale); it cannot follow a PRF whose shape
changes over the campaign (focus, thermal breathing). This module is psfmachine's perturbation model
(Hedges et al. 2021), written from its description, applied after the transform:

    model_ip(t) = F_i PRF(offset_ip(t)) x P(xi_ip, eta_ip, t),    P = 1 + sum_kj v_kj B_k(xi, eta) T_j(t),

``(xi, eta)`` the tangent-plane offset (arcsec) of pixel ``p`` from source ``i`` where the frame's transform
puts it, ``B_k`` a Cartesian tensor product of quadratic B-splines on ``[-time_radius, time_radius]^2``
(``time_nknots`` breakpoints per axis spaced uniformly in sqrt(|offset|), so denser in the core), ``T_j`` the
time vectors: powers 0..3 of the whitened time (scaled to [-1, 1] over the segment's bins), one set per
segment of the campaign (split at gaps longer than 5x the median cadence). The B-splines sum to 1 in the box,
so ``v = 0`` is "no perturbation"; written as psfmachine writes it (``P = sum w B T``) the prior centres the
time-constant weights on 1 and every other weight on 0, which is what this prior on ``v`` is. Beyond the box
there is no perturbation (``P = 1``): no pixel there takes part in the fit, and continuing the edge's values
outwards would carry the least constrained weights over the whole outer wing.

**The fit** (:func:`build_perturbation`). The ``time_mask`` frames, in time order, are cut into bins of
``time_resolution`` frames; with few frames the bins shrink so each segment has at least
:data:`MIN_BINS_PER_TERM` bins per time term, down to one frame a bin (one bin, as psfmachine makes of a
campaign shorter than its resolution, has no time information at all). Each bin's frames are averaged per WCS
(good pixels only) and the average fitted with the transform and the unperturbed shape: its transform, its
fluxes ``F_i(b)``. The data of the perturbation are the bin's pixels over what the source would give at its
mean flux ``F_i`` (mean of ``F_i(b)`` over the bins): ``y = (data - the other sources' model) / (F_i PRF)``,
so ``y - 1`` is the perturbation plus noise; the pixels used are those where the source gives at least
:data:`CLEAN_FRACTION` of the modelled light (the neighbours' light is modelled without the perturbation:
where it is a large part, ``y`` is biased), inside the box, good in the bin, however faint (``y`` is linear in
the data, so a faint pixel is unbiased, only weighted down: keeping only pixels above their error left the
outer wing unconstrained, measured 1.06x the oracle's scatter against 1.01x); sources that vary (their
``F_i(b) / F_i`` scatters by more than :data:`VARIABLE_SCATTER` times the median source's, after the common
trend of all sources is divided out) or are flagged are left out. The weights are the weighted linear least-
squares solution with a Gaussian prior of width :data:`PRIOR_SIGMA` on every ``v``; its normal equations are
summed bin by bin (``sum_b (B_b^T W_b B_b) kron (T_b T_b^T)``): one small dense system whatever the number of
bins. Outliers are clipped: points whose normalised residual is beyond ``clip_sigma`` robust standard
deviations are removed and the weights refitted, ``clip_iterations`` times at most (psfmachine's clipping
never removes a pixel).

**The fluxes**: every frame is then fitted with the transformed shape times ``P`` at the frame's time
(:func:`.timemodel.fit_frame_transform`); times outside a segment's bins use the nearest bin's time (no
polynomial extrapolation).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import sparse
from scipy.interpolate import BSpline

from .residuals import MeanFrame

__all__ = [
    "CLEAN_FRACTION",
    "MIN_BINS_PER_TERM",
    "PRIOR_SIGMA",
    "Perturbation",
    "TimeBasis",
    "VARIABLE_SCATTER",
    "box_radius",
    "build_perturbation",
    "cartesian_knots",
    "time_bins",
]

#: Degree of the Cartesian B-splines (psfmachine's).
DEGREE = 2
#: Highest power of the whitened time in a segment's time vectors (psfmachine's default).
TIME_POLY_ORDER = 3
#: A gap between frames longer than this many median cadences starts a new segment.
GAP_FACTOR = 5.0
#: Fewest time bins per time term of a segment when frames are few (a cubic needs 4 bins; 3x that keeps
#: its fit from following the noise of single bins).
MIN_BINS_PER_TERM = 3
#: Width of the Gaussian prior on every perturbation weight ``v`` (centred on 0, "no perturbation"). The data
#: decide where they constrain ``v`` (the core: a 10 % focus change moves P there by 0.15, measured the same
#: with 0.5); where few clean pixels are (the box's edges on a crowded field) psfmachine's 0.5 let the noise
#: of 8 frames reach P - 1 = +-0.8, this keeps it within +-0.15.
PRIOR_SIGMA = 0.1
#: A pixel is used when its source gives at least this fraction of the modelled light there.
CLEAN_FRACTION = 0.9
#: A source whose bin-to-bin flux scatter (common trend removed) exceeds this many times the median
#: source's is variable and is not used.
VARIABLE_SCATTER = 5.0


def box_radius(params) -> float:
    """Half-width (arcsec) of the perturbation's box: ``time_radius``, by default half ``rmax``."""
    return float(params.time_radius) if params.time_radius is not None else 0.5 * float(params.rmax)


def cartesian_knots(radius: float, nknots: int) -> np.ndarray:
    """The clamped knot vector of one axis: ``nknots`` breakpoints on ``[-radius, radius]`` uniform in
    sqrt(|offset|) (denser in the core).

    Parameters
    ----------
    radius : float
    nknots : int

    Returns
    -------
    numpy.ndarray
    """
    u = np.linspace(-1.0, 1.0, int(nknots))
    inner = np.sign(u) * u**2 * float(radius)
    return np.concatenate([[-radius] * DEGREE, inner, [radius] * DEGREE])


def _axis_design(x, knots):
    """(n, DEGREE + 1) columns and values of the B-splines of one axis at ``x`` (clipped into the box)."""
    lo, hi = knots[DEGREE], knots[-DEGREE - 1]
    d = BSpline.design_matrix(np.clip(x, lo, hi), knots, DEGREE).tocsr()
    d.sort_indices()
    cols = np.zeros((x.size, DEGREE + 1), dtype=np.int64)
    vals = np.zeros((x.size, DEGREE + 1))
    counts = np.diff(d.indptr)
    rows = np.repeat(np.arange(x.size), counts)
    slot = np.arange(d.indices.size) - d.indptr[rows]
    cols[rows, slot] = d.indices
    vals[rows, slot] = d.data
    return cols, vals


@dataclasses.dataclass(eq=False)
class TimeBasis:
    """The time vectors: powers 0..order of the whitened time per segment.

    Attributes
    ----------
    segments : numpy.ndarray
        (nsegments, 7): start, end (times of the segment's first and last frame), centre and half-range of
        its bins' times (the whitening: the bins' times become [-1, 1]), lowest and highest whitened bin
        time, the segment's order (the highest power of the whitened time).
    """

    segments: np.ndarray

    @property
    def orders(self) -> np.ndarray:
        return self.segments[:, 6].astype(int)

    @property
    def nterms(self) -> int:
        """Number of time vectors (all segments)."""
        return int(np.sum(self.orders + 1))

    def vector(self, time: float) -> np.ndarray:
        """The time vectors at ``time``: the segment holding it (else the nearest), whitened time clipped to
        the segment's bins."""
        seg = self.segments
        dist = np.maximum(seg[:, 0] - time, 0.0) + np.maximum(time - seg[:, 1], 0.0)
        s = int(np.argmin(dist))
        start, _, mean, std, zlo, zhi, order = seg[s]
        z = float(np.clip((time - mean) / std, zlo, zhi))
        out = np.zeros(self.nterms)
        first = int(np.sum(self.orders[:s] + 1))
        out[first : first + int(order) + 1] = z ** np.arange(int(order) + 1)
        return out


def time_bins(times, resolution: int) -> tuple[list[np.ndarray], TimeBasis]:
    """Cut frames into segments (at gaps > :data:`GAP_FACTOR` median cadences) and time bins.

    Parameters
    ----------
    times : numpy.ndarray
        (n,) frame times.
    resolution : int
        Frames a bin (``time_resolution``); fewer frames make smaller bins (module docstring).

    Returns
    -------
    tuple
        ``(bins, basis)``: the bins as arrays of positions in ``times`` (in time order) and the
        :class:`TimeBasis` of the bins' mean times.
    """
    times = np.asarray(times, dtype=float)
    order = np.argsort(times, kind="stable")
    t = times[order]
    dt = np.diff(t)
    cadence = np.median(dt[dt > 0]) if np.any(dt > 0) else 0.0
    cuts = np.flatnonzero(dt > GAP_FACTOR * cadence) + 1 if cadence > 0 else np.array([], int)
    bins, rows = [], []
    for seg in np.split(np.arange(t.size), cuts):
        n = seg.size
        nbins = max(math.ceil(n / resolution), min(n, MIN_BINS_PER_TERM * (TIME_POLY_ORDER + 1)))
        parts = [p for p in np.array_split(seg, nbins) if p.size]
        centres = np.array([t[p].mean() for p in parts])
        deg = min(TIME_POLY_ORDER, len(parts) - 1)
        # Whitened to [-1, 1] over the bins: every time vector is then bounded by 1 where it is used, so
        # the prior bounds each term's share of the perturbation alike.
        mean = float(centres.min() + centres.max()) / 2.0
        std = float(np.ptp(centres)) / 2.0 if deg > 0 else 1.0
        z = (centres - mean) / std
        rows.append([t[seg[0]], t[seg[-1]], mean, std, z.min(), z.max(), deg])
        bins.extend(order[p] for p in parts)
    return bins, TimeBasis(np.asarray(rows, dtype=float))


@dataclasses.dataclass(eq=False)
class Perturbation:
    """A fitted perturbation model (module docstring).

    Attributes
    ----------
    radius : float
        Half-width (arcsec) of the box of the Cartesian basis.
    nknots : int
        Breakpoints per axis.
    basis : TimeBasis
    weights : numpy.ndarray
        (nspatial, nterms) ``v``.
    diagnostics : dict
        Bins, points used and clipped, sources left out.
    """

    radius: float
    nknots: int
    basis: TimeBasis
    weights: np.ndarray
    diagnostics: dict = dataclasses.field(default_factory=dict)

    @property
    def knots(self) -> np.ndarray:
        return cartesian_knots(self.radius, self.nknots)

    @property
    def nside(self) -> int:
        """B-splines per axis."""
        return self.knots.size - DEGREE - 1

    def spatial_design(self, xi, eta) -> sparse.csr_array:
        """(n, nside^2) tensor-product B-splines at offsets ``(xi, eta)`` (arcsec; zero outside the box)."""
        return spatial_design(xi, eta, self.knots)

    def spatial_weights(self, time: float) -> np.ndarray:
        """The spatial weights of ``P - 1`` at ``time`` (``v @ T(time)``)."""
        return self.weights @ self.basis.vector(time)

    def factor(self, xi, eta, time: float) -> np.ndarray:
        """``P`` at offsets ``(xi, eta)`` (arcsec) and ``time``."""
        return self.at(time)(np.asarray(xi, float), np.asarray(eta, float))

    def at(self, time: float):
        """``P`` at ``time`` as a function of the offsets, for :func:`.timemodel.fit_frame_transform`."""
        u = self.spatial_weights(time)
        knots = self.knots
        return lambda xi, eta: 1.0 + spatial_design(xi, eta, knots) @ u


def spatial_design(xi, eta, knots) -> sparse.csr_array:
    """(n, nside^2) tensor-product B-splines (column ``kx * nside + ky``) at ``(xi, eta)``; rows of offsets
    outside the box are zero (no perturbation there)."""
    xi, eta = np.asarray(xi, float), np.asarray(eta, float)
    nside = knots.size - DEGREE - 1
    cx, vx = _axis_design(xi, knots)
    cy, vy = _axis_design(eta, knots)
    cols = (cx[:, :, None] * nside + cy[:, None, :]).reshape(xi.size, -1)
    vals = (vx[:, :, None] * vy[:, None, :]).reshape(xi.size, -1)
    radius = knots[-1]
    vals[(np.abs(xi) > radius) | (np.abs(eta) > radius)] = 0.0
    k = cols.shape[1]
    indptr = np.arange(0, k * xi.size + 1, k)
    return sparse.csr_array((vals.ravel(), cols.ravel(), indptr), shape=(xi.size, nside * nside))


def _bin_epochs(model, flux, err, mask, wcs_list, bins, times):
    """Each bin's frames averaged per WCS: (bin number, time, wcs, flux, err, good, n_frames) tuples."""
    T, ny, nx = flux.shape
    out = []
    for b, idx in enumerate(bins):
        groups = {}
        for t in idx:
            groups.setdefault(model.frames.entry(wcs_list[t], (ny, nx))["key"], []).append(int(t))
        for members in groups.values():
            mean = MeanFrame((ny, nx))
            sel = np.asarray(members)
            mean.add(flux[sel], err[sel], None if mask is None else mask[sel])
            e = mean.epoch(wcs_list[members[0]])
            out.append((b, float(np.mean(times[sel])), e["wcs"], e["flux"], e["err"], e["good"], sel.size))
    return out


def _variable_sources(amp, weights):
    """Sources whose bin-to-bin flux scatter, the common trend divided out, is an outlier (or whose mean
    flux is not positive)."""
    mean = np.sum(amp * weights[:, None], axis=0) / np.sum(weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = amp / mean
        trend = np.nanmedian(np.where(mean > 0, rel, np.nan), axis=1)
        rel = rel / trend[:, None]
        scatter = 1.4826 * np.nanmedian(np.abs(rel - np.nanmedian(rel, axis=0)), axis=0)
    ok = np.isfinite(scatter) & (mean > 0)
    if amp.shape[0] < 3 or not ok.any():
        return ~ok, mean
    limit = VARIABLE_SCATTER * np.median(scatter[ok])
    return ~ok | (scatter > limit), mean


def build_perturbation(model, shape, flux, err, mask, wcs_list, frames, times, start, fit_transform, params):
    """Fit the perturbation model (the module docstring's recipe).

    Parameters
    ----------
    model : PRFModel
        Its frame cache and flux prior are used.
    shape : ShapeModel
        The time model's (re-centred) shape.
    flux, err : numpy.ndarray
        (T, ny, nx) frames and errors.
    mask : numpy.ndarray or None
        (T, ny, nx) bad pixels.
    wcs_list : list of astropy.wcs.WCS
    frames : numpy.ndarray
        The frames to use (``time_mask``).
    times : numpy.ndarray
        (T,) frame times.
    start : callable
        ``start(time)``: a starting transform (the build transforms interpolated).
    fit_transform : callable
        ``fit_transform(wcs, f, e, m, a0) -> (a, solution, pairs)``: one frame's transform and fluxes
        (:func:`.timemodel.fit_frame_transform` on the frame's pairs).
    params : PRFParameters

    Returns
    -------
    Perturbation
    """
    from .timemodel import moved_geometry  # the time model imports this module

    T, ny, nx = flux.shape
    frames = np.asarray(frames)
    radius = box_radius(params)
    nknots = int(params.time_nknots)
    knots = cartesian_knots(radius, nknots)
    bins, basis = time_bins(times[frames], int(params.time_resolution))
    bins = [frames[b] for b in bins]
    epochs = _bin_epochs(model, flux, err, mask, wcs_list, bins, times)
    # Each bin epoch's transform and fluxes with the unperturbed shape.
    fitted, a = [], None
    for _, time, wcs, f, e, good, _ in epochs:
        a0 = start(time) if a is None else a
        a, solution, pairs = fit_transform(wcs, f.ravel(), e.ravel(), ~good.ravel(), a0)
        fitted.append((a, solution, pairs))
    amp = np.array([np.nan_to_num(s[6][0], nan=0.0) for _, s, _ in fitted])
    flagged = np.array([s[2][0] != 0 for _, s, _ in fitted]).any(axis=0)
    n_frames = np.array([ep[6] for ep in epochs], dtype=float)
    variable, mean_flux = _variable_sources(amp, n_frames)
    use_source = ~variable & ~flagged & (mean_flux > 0)

    # Per epoch: the clean pixels' design, y - 1 and weight, and the epoch's time vector.
    data = []
    for k, (_, time, _, f, e, good, _) in enumerate(epochs):
        a, solution, pairs = fitted[k]
        g = pairs.geom
        vals, _ = pairs.values(shape, a)
        mg = moved_geometry(g, *pairs.shifts(a))
        bg = float(solution[4][0]) if solution[4] is not None else 0.0
        own = amp[k][g.src] * vals
        total = np.bincount(g.pix, weights=own, minlength=ny * nx)[g.pix]
        expected = mean_flux[g.src] * vals
        fp, ep, gp = f.ravel()[g.pix], e.ravel()[g.pix], good.ravel()[g.pix]
        clean = (
            use_source[g.src]
            & gp
            & (vals > 0)
            & (own >= CLEAN_FRACTION * total)
            & (np.abs(mg.xi) <= radius)
            & (np.abs(mg.eta) <= radius)
        )
        c = np.flatnonzero(clean)
        y = (fp[c] - (total[c] - own[c]) - bg) / expected[c]
        w = (expected[c] / ep[c]) ** 2
        data.append((spatial_design(mg.xi[c], mg.eta[c], knots), y - 1.0, w, basis.vector(time)))
    nspatial = (knots.size - DEGREE - 1) ** 2
    keep = [np.ones(d[1].size, bool) for d in data]
    diag = {
        "bins": len(bins),
        "epochs": len(epochs),
        "frames": int(frames.size),
        "segments": int(basis.segments.shape[0]),
        "bin_times": sorted(float(ep[1]) for ep in epochs),
        "sources_used": int(use_source.sum()),
        "sources_variable": int((variable & ~flagged).sum()),
        "points": int(sum(d[1].size for d in data)),
        "clipped": [],
    }
    v = np.zeros((nspatial, basis.nterms))
    for iteration in range(int(params.clip_iterations) + 1):
        v = _solve_weights(data, keep, nspatial, basis.nterms)
        if iteration == int(params.clip_iterations):
            break
        chi = [(d[1] - d[0] @ (v @ d[3])) * np.sqrt(d[2]) for d in data]
        used = np.concatenate([c[k] for c, k in zip(chi, keep, strict=True)])
        if used.size == 0:
            break
        centre = np.median(used)
        sd = 1.4826 * np.median(np.abs(used - centre))
        newly = 0
        for c, k in zip(chi, keep, strict=True):
            out = k & (np.abs(c - centre) > params.clip_sigma * sd)
            newly += int(out.sum())
            k &= ~out
        diag["clipped"].append(newly)
        if newly == 0:
            break
    diag["points_used"] = int(sum(k.sum() for k in keep))
    return Perturbation(radius=radius, nknots=nknots, basis=basis, weights=v, diagnostics=diag)


def _solve_weights(data, keep, nspatial, nterms):
    """The prior-regularised least-squares weights ``v`` (nspatial, nterms) from the epochs' points."""
    n = nspatial * nterms
    normal = np.zeros((n, n))
    rhs = np.zeros(n)
    for (design, y, w, tvec), k in zip(data, keep, strict=True):
        d = design[np.flatnonzero(k)]
        wk = w[k]
        g = (d.T @ d.multiply(wk[:, None])).toarray()
        h = d.T @ (wk * y[k])
        normal += np.kron(g, np.outer(tvec, tvec))
        rhs += np.kron(h, tvec)
    normal[np.diag_indices(n)] += 1.0 / PRIOR_SIGMA**2
    return np.linalg.solve(normal, rhs).reshape(nspatial, nterms)
