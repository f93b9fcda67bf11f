"""The shape fit of a PRF model on its reference image(s): masks, weights, refinement, the flux prior.

Steps 2-3 of :mod:`.model`: the masks from flux estimates (never from the data), the weighted fit of
``log10(data / F)`` on uncontaminated pixels (:func:`fit_shape_weights`), ``shape_iterations``
rounds with the fluxes fitted on the reference image, then the joint all-pixel refinement
(:mod:`.refine`) and the flux prior of the per-frame fit.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy import sparse
from threadpoolctl import threadpool_limits

from .fluxfit import solve_reference
from .refine import JointPixels, refine_shape
from .shape import ShapeModel, model_values, shape_prior

__all__ = ["GN_STEPS", "empirical_profile", "fit_shape", "fit_shape_weights", "flux_prior"]


def fit_shape(model, epochs) -> None:
    """Fit ``model.shape`` on the reference image(s) ``epochs`` and set the model's masks, shape data,
    flux prior and diagnostics (steps 2-3 of :mod:`.model`).

    Parameters
    ----------
    model : PRFModel
        A model whose shape is still to fit; changed in place.
    epochs : list of dict
        The reference image(s) (:func:`~.inputs.reference_epochs`), the first the reference.
    """
    p = model.params
    sm = model.shape
    geoms = [model.frames.geometry(e["wcs"]) for e in epochs]
    ref_err = epochs[0]["err"][epochs[0]["good"]]
    if p.flux_cut_off is not None:
        cut = float(p.flux_cut_off)
    else:
        cut = 3.0 * float(np.median(ref_err)) if ref_err.size else 0.0
    model.diagnostics["flux_cut_off"] = cut
    model.diagnostics["crowded_fallback"] = False
    F = np.where(np.isfinite(model.flux_estimate) & (model.flux_estimate > 0), model.flux_estimate, np.nan)
    prof_r, prof_v = empirical_profile(geoms, epochs, F, p)
    model.diagnostics["empirical_profile"] = (prof_r, prof_v)
    # Prior on the shape weights: the empirical radial profile at each radial function's Greville point.
    grev = np.array([np.mean(sm.r_knots[j + 1 : j + 4]) for j in range(sm.n_radial)])
    lp = np.interp(grev, prof_r, np.log10(prof_v))
    w_prior = np.concatenate([lp[: sm.n_cut], np.repeat(lp[sm.n_cut :], sm.n_phi_knots)])
    model.diagnostics["shape_prior_mean"] = w_prior
    mu_fit = err_fit = None
    for it in range(p.shape_iterations):
        data = []
        masks = []
        for ie, (e, g) in enumerate(zip(epochs, geoms, strict=True)):
            emp = F[g.src] * np.interp(g.r, prof_r, prof_v)
            if it == 0:
                est = emp
            else:
                mvals = model_values(sm, g)
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
                model.diagnostics["crowded_fallback"] = True
            q = f[sel] / F[g.src[sel]]
            sq = er[g.pix[sel]] / F[g.src[sel]]
            star = g.src[sel] + ie * model.nsources  # one log-flux offset per (epoch, source)
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
        # Small dense solves (nbasis^2): one BLAS thread (measured: a 167 x 167 Cholesky took 116 ms
        # under thread oversubscription, 0.15 ms on one thread).
        with threadpool_limits(limits=1, user_api="blas"):
            keep = fit_shape_weights(sm, r, phi, q, sq, src, w_prior, p, gn_steps=GN_STEPS if last else 0)
        sm.normalise()
        model.frames.drop_models()
        if last and p.refine_iterations:
            _refine(model, epochs, geoms, w_prior)
        # Fluxes on the reference image with this shape (prior-free): next shape fit's F, and the prior.
        mu_fit, err_fit = solve_reference(model, epochs[0])
        ok = np.isfinite(mu_fit) & (mu_fit > 0)
        if ok.any():
            ratio = np.nanmedian(mu_fit[ok] / np.where(F[ok] > 0, F[ok], np.nan))
            F = np.where(ok, mu_fit, F * (ratio if np.isfinite(ratio) else 1.0))
    g0 = geoms[0]
    smask, unc = masks[0]
    model.source_mask = g0.matrix(True, smask).astype(bool)
    model.uncontaminated_source_mask = g0.matrix(True, unc).astype(bool)
    n_keep = keep.sum()
    sub = np.flatnonzero(keep & (q > 0))
    if sub.size > 50_000:
        sub = np.sort(np.random.default_rng(0).choice(sub, 50_000, replace=False))
    model.shape_data = {
        "r": r[sub],
        "phi": phi[sub],
        "y": np.log10(q[sub]),
        "xi": xi[sub],
        "eta": eta[sub],
    }
    model.diagnostics.update(n_shape_points=int(q.size), n_shape_kept=int(n_keep))
    model.prior_mu, model.prior_sigma = flux_prior(p, mu_fit, err_fit, epochs[0]["n_frames"])
    model.diagnostics["reference_flux"] = mu_fit
    model.diagnostics["reference_flux_err"] = err_fit


def _refine(model, epochs, geoms, w_prior):
    """The joint all-pixel refinement of the shape on the reference image(s) (:mod:`.refine`)."""
    problems = [JointPixels(model.shape, g, e) for e, g in zip(epochs, geoms, strict=True)]

    def amplitudes():
        return [solve_reference(model, e, raw=True)[0] for e in epochs]

    model.diagnostics.update(
        refine_shape(
            model.shape, problems, amplitudes, w_prior, model.params, on_shape_change=model.frames.drop_models
        )
    )


def flux_prior(params, mu_fit, err_fit, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian flux prior of the per-frame fit (``prior_mu``, ``prior_sigma`` of :class:`PRFParameters`).

    Parameters
    ----------
    params : PRFParameters
    mu_fit, err_fit : numpy.ndarray
        Prior-free fluxes and errors fitted on the reference image (NaN where flagged).
    n_frames : int
        Frames averaged into the reference image (its errors are per-frame errors / sqrt(n)).

    Returns
    -------
    mu, sigma : numpy.ndarray
        Per source; ``mu`` finite.
    """
    p = params
    nref = n_frames
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
    return mu, sig


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
