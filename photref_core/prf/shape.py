"""The PRF shape model (SPEC 6): polar B-spline basis, its normalisation, and the shape fit.

``log10(data / F_source)`` on uncontaminated good pixels is fitted with the product of a periodic cubic
B-spline in ``phi`` and a clamped cubic B-spline in ``r`` (breakpoints uniform in ``sqrt(r)``); see
:mod:`photref_core.prf.model` for the whole method.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy import sparse
from scipy.interpolate import BSpline

from .geometry import Geometry

__all__ = [
    "GN_STEPS",
    "ShapeModel",
    "empirical_profile",
    "fit_shape_weights",
    "model_matrix",
    "model_values",
    "row_block",
    "shape_prior",
    "slot_log_values",
]


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
        rc, rv, pc, pv = self.slots(r, phi)
        # Row-wise products: radial slot a x angular slot b. A phi-free (inner) radial function gets one
        # entry (slot b = 0) with the radial value, since the angular functions sum to 1.
        free = rc < self.n_cut  # (n, 4)
        cols = self.slot_columns(rc, pc)
        vals = np.where(free[:, :, None], rv[:, :, None], rv[:, :, None] * pv[:, None, :])
        valid = ~free[:, :, None] | (np.arange(4) == 0)[None, None, :]
        indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=(1, 2)))])
        m = sparse.csr_array((vals[valid], cols[valid], indptr), shape=(n, self.nbasis))
        m.has_canonical_format = False  # no duplicates, but columns may wrap in phi: not sorted
        m.sort_indices()
        return m

    def slots(self, r, phi):
        """The 4 radial and 4 angular B-spline slots of every point: ``(rc, rv, pc, pv)``, each (n, 4)
        (columns and values; :func:`slot_log_values` evaluates ``S`` from them without a design matrix).

        Parameters
        ----------
        r, phi : array_like
            Radius (arcsec, ``<= rmax``) and angle (rad).

        Returns
        -------
        tuple of numpy.ndarray
        """
        r = np.asarray(r, dtype=float).ravel()
        rc, rv = row_block(self.radial_design(r), r.size)
        pc, pv = row_block(self.angular_design(np.asarray(phi, dtype=float).ravel()), r.size)
        return rc, rv, pc, pv

    def slot_columns(self, rc, pc):
        """The basis column of every radial x angular slot product: (n, 4, 4) from the (n, 4) slot columns
        of :meth:`slots` (a phi-free radial function's column repeated over its 4 angular slots).

        Parameters
        ----------
        rc, pc : numpy.ndarray
            (n, 4) radial and angular slot columns.

        Returns
        -------
        numpy.ndarray
            (n, 4, 4) int64.
        """
        rc, pc = np.asarray(rc, np.int64), np.asarray(pc, np.int64)
        cols = self.n_cut + (rc[:, :, None] - self.n_cut) * self.n_phi_knots + pc[:, None, :]
        return np.where((rc < self.n_cut)[:, :, None], rc[:, :, None], cols)

    def weight_table(self, weights=None):
        """The weights as an (``n_radial``, ``n_phi_knots``) table: row ``j`` holds radial function ``j``'s
        angular weights (a phi-free function's one weight repeated: the angular functions sum to 1).

        Parameters
        ----------
        weights : numpy.ndarray, optional
            Default: ``self.weights``.

        Returns
        -------
        numpy.ndarray
        """
        w = self.weights if weights is None else np.asarray(weights, dtype=float)
        table = np.empty((self.n_radial, self.n_phi_knots))
        table[: self.n_cut] = w[: self.n_cut, None]
        table[self.n_cut :] = w[self.n_cut :].reshape(-1, self.n_phi_knots)
        return table

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
            out[inside] = slot_log_values(self.weight_table(), *self.slots(r[inside], phi[inside]))
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
        design, area = self._disc_quadrature(n_gauss, n_phi)
        self.norm = float(area @ 10.0 ** (design @ self.weights))
        return self.norm

    def norm_gradient(self, n_gauss=8, n_phi=None):
        """``d norm / d weights`` (the quadrature of :meth:`normalise`, differentiated).

        Parameters
        ----------
        n_gauss, n_phi : int

        Returns
        -------
        numpy.ndarray
            (nbasis,)
        """
        design, area = self._disc_quadrature(n_gauss, n_phi)
        return np.log(10.0) * (design.T @ (area * 10.0 ** (design @ self.weights)))

    def _disc_quadrature(self, n_gauss, n_phi):
        """Design matrix and area weights (r dr dphi) of the disc quadrature nodes; cached per knot set."""
        n_phi = 16 * self.n_phi_knots if n_phi is None else n_phi
        key = (n_gauss, n_phi)
        if getattr(self, "_quadrature", (None,))[0] != key:
            x, wx = np.polynomial.legendre.leggauss(n_gauss)
            a, b = self.breakpoints[:-1], self.breakpoints[1:]
            r = ((b - a)[:, None] * (x[None, :] + 1) / 2 + a[:, None]).ravel()
            wr = ((b - a)[:, None] / 2 * wx[None, :]).ravel()
            phi = np.arange(n_phi) * (2 * np.pi / n_phi)
            rr, pp = np.meshgrid(r, phi, indexing="ij")
            area = np.broadcast_to((wr * r)[:, None] * (2 * np.pi / n_phi), rr.shape).ravel()
            self._quadrature = (key, self.design(rr.ravel(), pp.ravel()), np.ascontiguousarray(area))
        return self._quadrature[1], self._quadrature[2]

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


def row_block(m, n: int):
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


def slot_log_values(table, rc, rv, pc, pv, chunk=1_000_000):
    """``S`` at points given by their B-spline slots (:meth:`ShapeModel.slots`) and the weight table
    (:meth:`ShapeModel.weight_table`): ``sum_a sum_b rv_a pv_b table[rc_a, pc_b]``, in bounded chunks.

    Parameters
    ----------
    table : numpy.ndarray
        (n_radial, n_phi_knots).
    rc, rv, pc, pv : numpy.ndarray
        (n, 4) each.
    chunk : int
        Points per chunk.

    Returns
    -------
    numpy.ndarray
        (n,)
    """
    n = rv.shape[0]
    out = np.empty(n)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        t = table[rc[a:b, :, None], pc[a:b, None, :]]  # (m, 4, 4)
        out[a:b] = np.einsum("ma,mb,mab->m", rv[a:b], pv[a:b], t)
    return out


def model_values(sm: ShapeModel, g: Geometry):
    """Normalised PRF (fraction of the source flux inside rmax) at every geometry pair; 0 beyond rmax."""
    out = np.zeros(g.r.size)
    inside = g.r <= sm.rmax
    if inside.any():
        s = sm.log_value(g.r[inside], g.phi[inside])
        out[inside] = 10.0**s / sm.norm * g.area[g.src[inside]]
    return out


def model_matrix(sm: ShapeModel, g: Geometry) -> sparse.csr_array:
    vals = model_values(sm, g)
    return g.matrix(vals, g.r <= sm.rmax)


def empirical_profile(geoms, epochs, F, p):
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


GN_STEPS = 2  # Gauss-Newton refinements of the shape fit in linear flux space


def fit_shape_weights(sm: ShapeModel, r, phi, q, sq, src, w_prior, p, gn_steps=GN_STEPS):
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
    prior_prec, prior_rhs = shape_prior(sm, w_prior, p)
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


def shape_prior(sm: ShapeModel, w_prior, p):
    """The Gaussian prior on the shape weights: its precision matrix and ``precision @ w_prior``.

    Independent Gaussians of width ``p.shape_prior_sigma`` dex on every weight about ``w_prior`` (the
    empirical profile), plus a smoothness term of width ``p.shape_phi_smooth`` dex on the differences of
    neighbouring angular weights of each radial function.

    Parameters
    ----------
    sm : ShapeModel
    w_prior : numpy.ndarray
    p : PRFParameters

    Returns
    -------
    tuple of numpy.ndarray
        ``(nbasis, nbasis)`` precision and ``(nbasis,)`` right-hand side.
    """
    prior_prec = np.diag(np.full(sm.nbasis, 1.0 / p.shape_prior_sigma**2))
    if p.shape_phi_smooth is not None:
        Dm = _phi_difference_operator(sm)
        prior_prec += (Dm.T @ Dm).toarray() / p.shape_phi_smooth**2
    return prior_prec, prior_prec @ w_prior


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
        rc, rv, pc, pv = sm.slots(r, phi)
        self.cols = sm.slot_columns(rc, pc).reshape(n, 16)
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
