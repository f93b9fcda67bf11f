"""Joint all-pixel refinement of the PRF shape weights (SPEC 6).

The selection-based shape fit (:func:`photref_core.prf.shapefit.fit_shape_weights`) sees each source's
pixels on their own: on crowded or undersampled fields no pixel is free of a neighbour's light, and what
it subtracts for the neighbours is only an estimate. Measured on Kepler-like fields (4"/pix, FWHM 1.5
px): isolated fluxes off by 1.5-3.1 % (median), chi std 4.9-9.8, the bias following brightness.

This refinement fits the shape weights ``w`` to every good pixel within ``rmax`` of any source with every
source's light modelled at once, no masks, no selection and no subtraction:

    m_p(w, a) = sum_i a_i E_ip(w),      E_ip = A_i 10**S_w(r_ip, phi_ip),      S_w = design(r, phi) @ w,

``a_i`` the source amplitudes (flux / norm: they multiply the unnormalised PRF), ``A_i`` the pixel area
at the source. It minimises ``sum_p U_p W_p (f_p - m_p)^2 + (w - w0)^T P (w - w0)`` over ``w`` and ``a``
(``W = 1/err^2``, ``U`` the robust weights, ``P`` and ``w0`` the shape prior's precision and mean with
its common level left free):

1. the prior-free flux solve on the reference image(s) with the starting shape gives the amplitudes
   (the caller's ``solve_amplitudes``, once);
2. each iteration: Huber weights (``p.refine_huber`` robust standard deviations) on the normalised
   residuals ``(f - m) / err``, scaled by their robust spread where that exceeds 1 (a model still far
   off is not mistaken for outliers);
3. the joint normal equations of ``(w, a)`` with ``J = dm/dw`` (``J[p, k] = ln10 sum_i a_i E_ip
   B_k(r_ip, phi_ip)``) and ``E = dm/da``; the amplitudes are eliminated exactly (a Schur complement
   through a sparse LU of ``E^T U W E``), so each step is a step of the whole problem, not of the shape
   alone (alternating with the flux solve converged linearly). Gauss-Newton while chi^2 per pixel is
   above 2, Newton (the residual terms ``U W r d2m``) below, where Gauss-Newton overshot the weakly
   constrained outer ring; Newton falls back to Gauss-Newton when its step is not a descent direction;
4. the step keeps the PRF's integral fixed to first order (the common level of ``w`` trades exactly
   with the amplitudes, and a step along it is linearised badly through ``10**S``), is capped at
   ``p.refine_max_step`` dex and halved while it does not lower the objective (undamped, a refinement
   diverged on an undersampled field); the amplitudes take the step's own update;
5. at the end, the shape is renormalised (the amplitudes, unnormalised, need it in no step).

It stops when the largest weight change is below ``p.refine_tol`` dex, or after ``p.refine_iterations``.

``J`` is never stored: it is built and reduced in blocks of pixels (a dense block of at most
``block_bytes``, filled with one ``bincount``), so memory stays bounded on large frames; the normal
matrix is ``nbasis x nbasis``. Dense BLAS work runs on one thread (threadpoolctl): the systems are small
and thread oversubscription cost 100x on a 167 x 167 Cholesky. The sums over pixel blocks and cells are
split over :data:`~.parameters.KERNEL_THREADS` Python threads instead (1.6 -> 1.2 s an iteration at
1,500 sources on 512x512).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
from scipy import sparse
from scipy.linalg.blas import dsyrk
from scipy.sparse.linalg import splu
from threadpoolctl import threadpool_limits

from .geometry import Geometry
from .parameters import KERNEL_THREADS
from .shape import ShapeModel, shape_prior, slot_log_values

__all__ = ["JointPixels", "refine_shape"]

_LN10 = np.log(10.0)
_MAX_HALVINGS = 10


class JointPixels:
    """One reference image's good pixels within ``rmax`` of any source, as (source, pixel) pairs.

    The pairs are sorted by pixel, so a block of consecutive pairs covers a block of whole pixels. The
    B-spline values of each pair are kept as their 4 radial and 4 angular slots (the 16 products are
    formed block by block), so memory is ~100 bytes a pair.

    Parameters
    ----------
    sm : ShapeModel
    g : Geometry
        The sources on the image.
    epoch : dict
        ``flux``, ``err`` and ``good`` images (the reference image and its error).
    """

    def __init__(self, sm: ShapeModel, g: Geometry, epoch: dict):
        good = np.asarray(epoch["good"]).ravel()
        sel = (g.r <= sm.rmax) & good[g.pix]
        pix = g.pix[sel]
        order = np.argsort(pix, kind="stable")
        pix = pix[order]
        self.src = g.src[sel][order]
        self.area = g.area[self.src]
        self.pixels, self.row = np.unique(pix, return_inverse=True)
        self.npix = self.pixels.size
        self.npairs = self.src.size
        # Pair ranges of whole pixels: pair k belongs to pixel row[k]; first pair of each pixel.
        self.pixel_start = np.searchsorted(self.row, np.arange(self.npix + 1))
        r, phi = g.r[sel][order], g.phi[sel][order]
        rc, rv, pc, pv = sm.slots(r, phi)
        self.rc, self.rv = rc.astype(np.int16), rv
        self.pc, self.pv = pc.astype(np.int16), pv
        self.nbasis = sm.nbasis
        self.shape = sm
        # Cells: pairs with the same 16 basis columns (4 radial x 4 angular slots; phi-free functions
        # repeat their column). A pair's columns are its cell's, and sums over pairs are small dense
        # products per cell.
        key = np.zeros(rc.shape[0], np.int64)  # the 8 slot columns as one integer
        for c, base in ((rc, sm.n_radial), (pc, sm.n_phi_knots)):
            for j in range(4):
                key = key * base + c[:, j]
        _, first, cell_id = np.unique(key, return_index=True, return_inverse=True)
        self.cell_cols = sm.slot_columns(rc[first], pc[first]).reshape(-1, 16)
        self.cell_id = cell_id.ravel().astype(np.int32)
        self.cell_pairs = np.argsort(self.cell_id, kind="stable")
        self.cell_bounds = np.searchsorted(
            self.cell_id[self.cell_pairs], np.arange(self.cell_cols.shape[0] + 1)
        )
        # The slot values in cell order: each cell's pairs are then a slice, not a gather (the gathers were
        # a quarter of an iteration on a crowded 512x512 field).
        self.cell_rv, self.cell_pv = self.rv[self.cell_pairs], self.pv[self.cell_pairs]
        self.data = np.asarray(epoch["flux"], dtype=float).ravel()[self.pixels]
        err = np.asarray(epoch["err"], dtype=float).ravel()[self.pixels]
        self.ivar = 1.0 / err**2

    def _slots(self, a, b):
        """Columns and values of the 16 basis products of pairs ``a:b`` (phi-free functions repeated)."""
        vals = (self.rv[a:b, :, None] * self.pv[a:b, None, :]).reshape(-1, 16)
        return self.cell_cols[self.cell_id[a:b]], vals

    def _blocks(self, block_pairs):
        """Pair ranges ``(a, b, first pixel, last pixel + 1)`` of whole pixels, about ``block_pairs`` each."""
        a, p0 = 0, 0
        while a < self.npairs:
            p1 = int(np.searchsorted(self.pixel_start, a + block_pairs, side="right")) - 1
            p1 = max(p1, p0 + 1)
            b = int(self.pixel_start[min(p1, self.npix)])
            yield a, b, p0, p1
            a, p0 = b, p1

    def pair_prf(self, w, block_pairs=500_000):
        """Each pair's unnormalised PRF value ``A_i 10**S_w(r_ip, phi_ip)`` (the model per unit amplitude)."""
        table = self.shape.weight_table(w)
        s = slot_log_values(table, self.rc, self.rv, self.pc, self.pv, chunk=block_pairs)
        return self.area * 10.0**s

    def pixel_model(self, pair_prf, amp):
        """Per-pixel model ``sum_i amp_i pair_prf_ip``: every source's light."""
        return np.bincount(self.row, weights=amp[self.src] * pair_prf, minlength=self.npix)

    def normal_equations(self, pair_prf, amp, weights, resid, nsources, block_bytes=32 << 20):
        """The terms of the joint normal equations of the shape weights and the amplitudes.

        With ``J = d model / d w`` (pixels x nbasis, built block by block and never stored),
        ``E = d model / d amp`` (pixels x sources: the pair PRF values), ``U = diag(weights)`` and ``r``
        the residuals: the Gauss-Newton blocks, and Newton's residual terms (``RES = sum_p U r d2m/dw2``,
        ``EUJ_res = sum_p U r d2m/(da dw)``) that :class:`_Profiled` subtracts for a Newton step.

        Parameters
        ----------
        pair_prf : numpy.ndarray
            :meth:`pair_prf` at the current weights.
        amp : numpy.ndarray
            (nsources,) amplitudes.
        weights, resid : numpy.ndarray
            Per pixel.
        nsources : int
        block_bytes : int
            Bound on the dense Jacobian block.

        Returns
        -------
        dict
            ``JUJ`` and ``RES`` (nbasis, nbasis), ``JUr`` (nbasis,), ``EUJ`` and ``EUJ_res``
            (nsources, nbasis), ``EUE`` (sparse nsources x nsources) and ``EUr`` (nsources,).
        """
        nb = self.nbasis
        pair_model = amp[self.src] * pair_prf
        pairs_per_pixel = max(1.0, self.npairs / max(self.npix, 1))
        block_pairs = max(16, int(block_bytes / (8 * nb) * pairs_per_pixel))
        blocks = list(self._blocks(block_pairs))
        ur = (weights * resid)[self.row]
        cells = np.arange(self.cell_cols.shape[0])

        def gauss_newton(part):  # the Jacobian's terms over some blocks of whole pixels
            JUJ = np.zeros((nb, nb), order="F")
            JUr = np.zeros(nb)
            EUJ = np.zeros((nsources, nb))
            for a, b, p0, p1 in part:
                cols, vals = self._slots(a, b)
                local = (self.row[a:b] - p0)[:, None] * nb + cols
                Jb = np.bincount(
                    local.ravel(),
                    weights=(vals * (_LN10 * pair_model[a:b])[:, None]).ravel(),
                    minlength=(p1 - p0) * nb,
                ).reshape(p1 - p0, nb)
                wb = weights[p0:p1]
                # J^T U J is symmetric: BLAS syrk forms one triangle (half the flops of a GEMM), as A A^T
                # of A = (U^1/2 J)^T, Fortran-ordered as it is (J^T J of the C-ordered block copied it).
                JUJ = dsyrk(
                    1.0, (Jb * np.sqrt(wb)[:, None]).T, beta=1.0, c=JUJ, trans=0, lower=0, overwrite_c=1
                )
                JUr += Jb.T @ (wb * resid[p0:p1])
                Eb = sparse.csr_array(
                    (pair_prf[a:b] * weights[self.row[a:b]], (self.src[a:b], self.row[a:b] - p0)),
                    shape=(nsources, p1 - p0),
                )
                EUJ += Eb @ Jb
            return JUJ, JUr, EUJ

        def newton(part):
            # Newton's residual terms: d2 m / dw dw = ln10^2 m b b^T and d2 m / dw da_i = ln10 e_i b per
            # pair, weighted by U r; summed per cell (pairs sharing their 16 basis columns), small products.
            RES = np.zeros((nb, nb))
            EUJ_res = np.zeros((nsources, nb))
            for k in part:
                a, b = self.cell_bounds[k], self.cell_bounds[k + 1]
                idx = self.cell_pairs[a:b]
                V = (self.cell_rv[a:b, :, None] * self.cell_pv[a:b, None, :]).reshape(-1, 16)
                c = self.cell_cols[k]
                q = ur[idx] * pair_prf[idx]
                np.add.at(
                    RES, (c[:, None], c[None, :]), V.T @ (V * (_LN10**2 * q * amp[self.src[idx]])[:, None])
                )
                src = self.src[idx]
                per_src = np.bincount(
                    (src[:, None] * 16 + np.arange(16)).ravel(),
                    weights=(V * (_LN10 * q)[:, None]).ravel(),
                    minlength=nsources * 16,
                ).reshape(nsources, 16)
                np.add.at(EUJ_res.T, c, per_src.T)
            return RES, EUJ_res

        # Both sums split in contiguous parts over the threads (numpy and BLAS release the GIL in the
        # heavy steps); the parts are added in a fixed order, so the result does not depend on timing.
        n = KERNEL_THREADS
        jobs = [(gauss_newton, part) for part in _split(blocks, n)]
        n_gn = len(jobs)
        jobs += [(newton, part) for part in _split(cells, n)]
        if n > 1:
            with ThreadPoolExecutor(n) as pool:
                done = list(pool.map(lambda job: job[0](job[1]), jobs))
        else:
            done = [fn(part) for fn, part in jobs]
        JUJ, JUr, EUJ = (sum(terms) for terms in zip(*done[:n_gn], strict=True))
        RES, EUJ_res = (sum(terms) for terms in zip(*done[n_gn:], strict=True))
        JUJ = np.triu(JUJ) + np.triu(JUJ, 1).T
        E = sparse.csr_array((pair_prf, (self.row, self.src)), shape=(self.npix, nsources))
        EU = E.T.multiply(weights[None, :]).tocsr()
        return {
            "JUJ": JUJ,
            "RES": RES,
            "EUJ_res": EUJ_res,
            "JUr": JUr,
            "EUJ": EUJ,
            "EUE": (EU @ E).tocsc(),
            "EUr": EU @ resid,
        }


def _split(items, n: int) -> list:
    """``items`` in ``n`` contiguous parts of nearly equal length (none empty unless ``items`` is)."""
    bounds = np.linspace(0, len(items), min(n, max(1, len(items))) + 1).astype(int)
    return [items[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _huber(z, k):
    az = np.abs(z)
    return np.where(az <= k, 1.0, k / np.maximum(az, 1e-300))


class _Profiled:
    """The amplitudes eliminated from one image's normal equations (a Schur complement)."""

    def __init__(self, ne, newton=False):
        if newton:
            ne = dict(ne, JUJ=ne["JUJ"] - ne["RES"], EUJ=ne["EUJ"] - ne["EUJ_res"])
        EUE = ne["EUE"].tolil()
        diag = EUE.diagonal()
        empty = diag <= 0  # sources with no pixel here: decoupled, any amplitude change is 0
        EUE.setdiag(np.where(empty, 1.0, diag))
        self.lu = splu(EUE.tocsc())
        self.EUJ, self.EUr = ne["EUJ"], ne["EUr"]
        self.X = self.lu.solve(self.EUJ)  # EUE^-1 EUJ
        self.y = self.lu.solve(self.EUr)  # EUE^-1 EUr
        self.H = ne["JUJ"] - self.EUJ.T @ self.X
        self.g = ne["JUr"] - self.EUJ.T @ self.y

    def amplitude_step(self, dw):
        """The amplitudes' part of the joint step for a shape step ``dw``."""
        return self.y - self.X @ dw


def _gauged_solve(H, grad, c):
    """Minimise ``dw^T H dw / 2 - grad^T dw`` subject to ``c^T dw = 0`` (``H`` may be singular along a
    direction that ``c`` fixes): the symmetric KKT system."""
    n = grad.size
    K = np.zeros((n + 1, n + 1))
    K[:n, :n] = H
    K[:n, n] = K[n, :n] = c
    return scipy.linalg.solve(K, np.concatenate([grad, [0.0]]), assume_a="sym", check_finite=False)[:n]


def refine_shape(sm: ShapeModel, problems, solve_amplitudes, w_prior, p, on_shape_change=None) -> dict:
    """Refine ``sm.weights`` jointly on every pixel of the reference image(s) (see the module docstring).

    Parameters
    ----------
    sm : ShapeModel
        The starting shape (normalised); updated in place and left normalised.
    problems : list of JointPixels
        One per reference image.
    solve_amplitudes : callable
        ``solve_amplitudes() -> list of numpy.ndarray``: per reference image, every source's flux fitted
        (prior-free) with the current normalised shape; non-finite values count as 0.
    w_prior : numpy.ndarray
        Mean of the shape prior.
    p : PRFParameters
        ``refine_iterations``, ``refine_tol``, ``refine_max_step``, ``refine_huber`` and the shape prior.
    on_shape_change : callable, optional
        Called once ``sm.weights`` and ``sm.norm`` hold the refined shape (e.g. to drop cached model
        matrices).

    Returns
    -------
    dict
        ``refine_iterations`` (done), ``refine_converged``, ``refine_chi2`` (chi^2 per pixel of the
        reference image(s) before each iteration and at the end, with the amplitudes of the joint
        steps), ``refine_max_dw`` (per iteration, dex),
        ``refine_halvings`` (per iteration) and ``refine_objective_drop`` (per iteration: how much the
        step lowered the robustly weighted chi^2 plus prior, never negative unless no step helped).
    """
    prior_prec, _ = shape_prior(sm, w_prior, p)
    # The prior constrains the shape, not its level: a uniform shift of the weights only rescales S, which
    # the normalisation removes and the amplitudes absorb. Its level is marginalised (a flat level
    # parameter eliminated), so the objective is exactly flat along the shift and the gauge below picks
    # the point; a prior on the level fought the gauge and made the outer ring oscillate.
    level = prior_prec @ np.ones(sm.nbasis)
    prior_prec = prior_prec - np.outer(level, level) / level.sum()
    k = np.inf if p.refine_huber is None else float(p.refine_huber)
    w = sm.weights.copy()
    chi2, max_dw, halvings, objective_drop, newton_used = [], [], [], [], []
    converged = False
    done = 0

    def diagnostics():
        return {
            "refine_iterations": done,
            "refine_converged": converged,
            "refine_chi2": chi2,
            "refine_max_dw": max_dw,
            "refine_halvings": halvings,
            "refine_objective_drop": objective_drop,
            "refine_newton": newton_used,
        }

    if sum(q.npix for q in problems) == 0:
        return diagnostics()

    def residuals(w_, amps):
        prfs = [q.pair_prf(w_) for q in problems]
        return prfs, [q.data - q.pixel_model(e, a) for q, e, a in zip(problems, prfs, amps, strict=True)]

    def objective(w_, resid, uw):
        d = w_ - w_prior
        return sum(float(np.sum(u * r * r)) for u, r in zip(uw, resid, strict=True)) + float(
            d @ prior_prec @ d
        )

    def chi2_per_pixel(resid):
        return float(np.mean(np.concatenate([r * r * q.ivar for q, r in zip(problems, resid, strict=True)])))

    with threadpool_limits(limits=1, user_api="blas"):
        # The flux solve runs once; then the amplitudes follow the joint steps (they multiply the
        # unnormalised PRF, so renormalising the shape leaves them valid). On a crowded field the flux
        # solve is one dense system of every source: one solve, not one an iteration.
        amps = [
            np.nan_to_num(np.asarray(f, dtype=float), nan=0.0, posinf=0.0, neginf=0.0) / sm.norm
            for f in solve_amplitudes()
        ]
        ns = amps[0].size
        prfs, resid = residuals(w, amps)
        for it in range(1, int(p.refine_iterations) + 1):
            done = it
            z = np.concatenate([r * np.sqrt(q.ivar) for q, r in zip(problems, resid, strict=True)])
            chi2.append(float(np.mean(z * z)))
            scale = max(1.0, 1.4826 * float(np.median(np.abs(z - np.median(z)))))
            uw = [
                q.ivar * _huber(r * np.sqrt(q.ivar) / scale, k) for q, r in zip(problems, resid, strict=True)
            ]
            H = prior_prec.copy()
            grad = -prior_prec @ (w - w_prior)
            nes = [
                q.normal_equations(e, a, u, r, ns)
                for q, e, a, u, r in zip(problems, prfs, amps, uw, resid, strict=True)
            ]
            # Gauge: the overall level of S trades exactly with the amplitudes (a step along it is
            # linearised badly through 10**S); steps keep the PRF's integral fixed to first order.
            c = sm.norm_gradient() / sm.norm  # (a scale for conditioning only: the norm of the start)
            for newton in (True, False) if chi2[-1] < 2.0 else (False,):
                profiled = [_Profiled(ne, newton) for ne in nes]
                Hn = H + sum(pr.H for pr in profiled)
                gn = grad + sum(pr.g for pr in profiled)
                dw = _gauged_solve(Hn, gn, c)
                if not newton or dw @ gn > 0:
                    break
            newton_used.append(newton)
            big = float(np.max(np.abs(dw)))
            if big > p.refine_max_step:
                dw *= p.refine_max_step / big
            phi0 = objective(w, resid, uw)
            n_half = 0
            while True:
                trial_amps = [a + pr.amplitude_step(dw) for a, pr in zip(amps, profiled, strict=True)]
                trial_prfs, trial = residuals(w + dw, trial_amps)
                phi1 = objective(w + dw, trial, uw)
                if phi1 <= phi0 or n_half >= _MAX_HALVINGS:
                    break
                dw *= 0.5
                n_half += 1
            halvings.append(n_half)
            if phi1 > phi0:  # no step lowers the objective: at its minimum, to rounding
                objective_drop.append(0.0)
                max_dw.append(0.0)
                converged = True
                break
            objective_drop.append(phi0 - phi1)
            w = w + dw
            amps, prfs, resid = trial_amps, trial_prfs, trial
            sm.weights = w  # the gauge of the next step is taken at the new weights
            max_dw.append(float(np.max(np.abs(dw))))
            if max_dw[-1] < p.refine_tol:
                converged = True
                break
        chi2.append(chi2_per_pixel(resid))
    # The amplitudes multiply the unnormalised PRF, so the shape is normalised once, at the end.
    sm.normalise()
    if on_shape_change is not None:
        on_shape_change()
    return diagnostics()
