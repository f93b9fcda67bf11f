"""The per-frame flux solve (SPEC 6): all source weights together, per connected group of
overlapping sources, batched over frames; no dense nsrc x nsrc matrix is ever formed or inverted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

__all__ = [
    "FLAG_LOW_COVERAGE",
    "FLAG_SOLVE_FAILED",
    "FitResult",
    "SolvePlan",
    "same_pattern",
]


#: Flag bit: less than ``min_good_fraction`` (default half) of the source's model lies on good pixels of
#: the frame (masked, non-finite, or off the frame); its flux and error are NaN.
FLAG_LOW_COVERAGE = 1


#: Flag bit: the source's group system could not be solved (singular) or gave a non-finite answer.
FLAG_SOLVE_FAILED = 2


_SOLVE_CHUNK = 4_000_000  # float64 elements of one batch of group matrices (32 MB)


class SolvePlan:
    """The structure of the flux fit for one mean_model (one WCS): groups, pair products.

    Parameters
    ----------
    X : scipy.sparse.csr_array
        (nsources x npixels) model.
    keep_zeros : bool
        Keep explicit zeros in the pattern (a model whose values move with the sources, :mod:`.timemodel`:
        a pair outside ``rmax`` now may be inside next frame, and :meth:`refresh` needs one pattern).
    """

    def __init__(self, X: sparse.csr_array, keep_zeros: bool = False):
        ns, npix = X.shape
        self.nsrc, self.npix = ns, npix
        X = sparse.csr_array(X)
        if not keep_zeros:
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
        if not same_pattern(self, X):
            raise ValueError("refresh needs the sparsity pattern the plan was built for")
        x = np.asarray(X.data, dtype=float)
        self.Xc = sparse.csr_array((x[self._perm_x], self.Xc.indices, self.Xc.indptr), shape=self.Xc.shape)
        self.P = sparse.csr_array(
            (x[self._a] * x[self._b], self.P.indices, self.P.indptr), shape=self.P.shape
        )
        self.row_sum = np.asarray(self.Xc.sum(axis=1)).ravel()
        return self

    def solve(self, F, W, mu, isig2, bg=None, extra=None):
        """Solve a batch of frames.

        Parameters
        ----------
        F, W : numpy.ndarray
            (T, nu) data and inverse variances on the model pixels (W = 0 where bad, F = 0 there).
        mu, isig2 : numpy.ndarray
            (nsrc,) prior means and 1/sigma^2 (0: no prior).
        bg : tuple of numpy.ndarray, optional
            (s, c): per-frame sums of W and W*F over all good pixels of the frame, to fit a background.
        extra : numpy.ndarray, optional
            (nsrc, m) more right-hand sides for a batch of ONE frame, solved with its flux normal matrix
            (the background, if any, left out): the time model's coupling of fluxes and transform.

        Returns
        -------
        w, var : numpy.ndarray
            (T, nsrc) posterior means and variances.
        bgw, bgvar : numpy.ndarray or None
            (T,) background and its variance.
        failed : numpy.ndarray of bool
            (T, nsrc) sources whose group system was singular.
        extra_solution : numpy.ndarray
            (nsrc, m), only when ``extra`` is given.
        """
        T = F.shape[0]
        if extra is not None and T != 1:
            raise ValueError("extra right-hand sides need a batch of one frame")
        extra_out = None if extra is None else np.zeros(extra.shape)
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
                if extra is not None:
                    extra_out[mem] = np.einsum("gij,gjm->gim", Minv[:, 0], extra[mem] * ~dead[:, 0, :, None])
        bgw = bgvar = None
        if bg is not None:
            s, c = bg
            denom = s - np.sum(u * z, axis=0)
            bgw = (c - np.sum(u * w0, axis=0)) / denom
            bgvar = 1.0 / denom
            w0 = w0 - z * bgw[None, :]
            var = var + z * z / denom[None, :]
        if extra is not None:
            return w0.T, var.T, bgw, bgvar, failed.T, extra_out
        return w0.T, var.T, bgw, bgvar, failed.T


def same_pattern(plan, X) -> bool:
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
    transform : numpy.ndarray or None
        (T, nterms) each frame's fitted geometric transform (the time model, :mod:`.timemodel`), pixels;
        ``None`` without a time model.
    transform_terms : tuple of str or None
        The names of the transform's terms (:data:`~.timemodel.TRANSFORM_TERMS`).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    flag: np.ndarray
    good_fraction: np.ndarray
    source_id: np.ndarray
    background: np.ndarray | None = None
    background_err: np.ndarray | None = None
    model: np.ndarray | None = None
    transform: np.ndarray | None = None
    transform_terms: tuple | None = None
