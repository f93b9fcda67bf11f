"""The per-frame flux solve (SPEC 6): all source weights together, per connected group of
overlapping sources, batched over frames; no dense nsrc x nsrc matrix is ever formed or inverted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components, reverse_cuthill_mckee

__all__ = [
    "FLAG_LOW_COVERAGE",
    "BLOCK_MIN_GROUP",
    "FLAG_SOLVE_FAILED",
    "FitResult",
    "MIN_BLOCK",
    "SolvePlan",
    "same_pattern",
]


#: Flag bit: less than ``min_good_fraction`` (default half) of the source's model lies on good pixels of
#: the frame (masked, non-finite, or off the frame); its flux and error are NaN.
FLAG_LOW_COVERAGE = 1


#: Flag bit: the source's group system could not be solved (singular) or gave a non-finite answer.
FLAG_SOLVE_FAILED = 2


_SOLVE_CHUNK = 4_000_000  # float64 elements of one batch of group matrices (32 MB)

#: Groups of overlapping sources larger than this are solved by block elimination (:class:`SolvePlan`);
#: smaller ones as dense batches (measured: the block path is ~1.3x slower on fields of small groups).
BLOCK_MIN_GROUP = 64

#: The shortest block of a block-solved group (sources): shorter blocks make more, less efficient products.
MIN_BLOCK = 32


class SolvePlan:
    """The structure of the flux fit for one mean_model (one WCS): groups, pair products, block orderings.

    Built once per model and pixel grid (:mod:`.cache`) and used for every frame on that grid. The pair
    products cover the upper triangle of ``X X^T`` (i <= j): their pattern comes from one boolean sparse
    product and each (pair, pixel) entry finds its pair by binary search, so nothing is sorted or made
    unique over the ~10^7 entries of a crowded field.

    Groups of at most ``block_min_group`` sources are solved as dense batches of their size (all groups of a
    size and all frames at once); a larger group -- a crowded field where overlaps chain every source into
    one component -- is ordered by reverse Cuthill-McKee, which makes its matrix block-tridiagonal, and
    solved by block elimination (:class:`_BlockGroup`): the cost grows with the group size times the
    block size squared, not with the group size cubed, and the inverse is never formed.

    Parameters
    ----------
    X : scipy.sparse.csr_array
        (nsources x npixels) model. Its explicit zeros are removed and its indices sorted in place.
    keep_zeros : bool
        Keep explicit zeros in the pattern (a model whose values move with the sources, :mod:`.timemodel`:
        a pair outside ``rmax`` now may be inside next frame, and :meth:`refresh` needs one pattern).
    block_min_group : int, optional
        Groups larger than this are solved by blocks (default :data:`BLOCK_MIN_GROUP`).
    min_block : int, optional
        The shortest block (sources; default :data:`MIN_BLOCK`).
    """

    def __init__(
        self,
        X: sparse.csr_array,
        keep_zeros: bool = False,
        block_min_group: int | None = None,
        min_block: int | None = None,
    ):
        ns, npix = X.shape
        self.nsrc, self.npix = ns, npix
        X = sparse.csr_array(X)
        if not keep_zeros:
            X.eliminate_zeros()
        X.sort_indices()
        self._pattern = (X.indptr.copy(), X.indices.copy())
        used = np.zeros(npix, bool)
        used[X.indices] = True
        self.pix_u = np.flatnonzero(used).astype(np.int64)
        nu = self.pix_u.size
        remap = np.cumsum(used) - 1  # monotone: X's entries keep their order on the model pixels
        small = np.int32 if max(X.nnz, nu) < 2**31 else np.int64
        self.Xc = sparse.csr_array(
            (np.asarray(X.data, float), remap[X.indices].astype(small), X.indptr.astype(small)),
            shape=(ns, nu),
        )
        # The column-major order of the entries: positions carried as data through the conversion.
        by_pixel = sparse.csr_array(
            (np.arange(X.nnz, dtype=float), self.Xc.indices, self.Xc.indptr), shape=(ns, nu)
        ).tocsc()
        by_pixel.sort_indices()
        entry = by_pixel.data.astype(np.int64)
        # The pairs (i <= j) of sources sharing a pixel, as sorted keys i * ns + j.
        pattern = sparse.csr_array(
            (np.ones(X.nnz, np.float32), self.Xc.indices, self.Xc.indptr), shape=(ns, nu)
        )
        G = sparse.triu(pattern @ pattern.T, format="csr")
        G.sort_indices()
        self.pair_i = np.repeat(np.arange(ns, dtype=np.int64), np.diff(G.indptr))
        self.pair_j = G.indices.astype(np.int64)
        keys = self.pair_i * ns + self.pair_j
        # Every (pair, pixel) entry, pixel by pixel: an entry pairs with itself and the entries after it.
        counts = np.diff(by_pixel.indptr)
        pixel = np.repeat(np.arange(nu), counts)
        n_after = counts[pixel] - (np.arange(by_pixel.nnz) - by_pixel.indptr[pixel])
        first = np.repeat(np.arange(by_pixel.nnz), n_after)
        second = first + (np.arange(first.size) - np.repeat(np.cumsum(n_after) - n_after, n_after))
        src = by_pixel.indices.astype(np.int64)
        pair = np.searchsorted(keys, src[first] * ns + src[second])
        P = sparse.coo_array(
            (np.arange(first.size, dtype=float), (pair, pixel[first])), shape=(keys.size, nu)
        ).tocsr()
        order = P.data.astype(np.int64)
        # int32 indices where they fit: 6 M pair products at 1,500 sources on 512x512 took 190 MB with
        # int64 ones, and the per-frame product P @ W reads them all.
        index = np.int32 if max(first.size, X.nnz, nu) < 2**31 else np.int64
        self._a, self._b = entry[first[order]].astype(index), entry[second[order]].astype(index)
        P.indices, P.indptr = P.indices.astype(index), P.indptr.astype(index)  # P.data = x[_a] * x[_b]
        self.P = P
        del first, second, pair, order
        self.refresh(X)
        self._build_groups(
            G,
            BLOCK_MIN_GROUP if block_min_group is None else int(block_min_group),
            MIN_BLOCK if min_block is None else int(min_block),
        )

    def _build_groups(self, G, block_min_group: int, min_block: int):
        """Connected groups of overlapping sources (``G``: the overlap graph's upper triangle), small ones by
        size class, large ones by blocks."""
        ns = self.nsrc
        self.n_groups, labels = connected_components(G, directed=False)
        self.labels = labels
        sizes = np.bincount(labels, minlength=self.n_groups)
        self.group_sizes = sizes
        order = np.argsort(labels, kind="stable")
        gstart = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        local = np.empty(ns, np.int64)
        local[order] = np.arange(ns) - gstart[labels[order]]
        pair_group = labels[self.pair_i]
        pair_size = sizes[pair_group]
        self.classes = []
        for kk in np.unique(sizes[sizes <= block_min_group]):
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
                    gpos=gpos[pair_group[pidx]],
                    li=local[self.pair_i[pidx]],
                    lj=local[self.pair_j[pidx]],
                )
            )
        self.blocks = []
        big = np.flatnonzero(sizes > block_min_group)
        if big.size:
            by_group = np.argsort(pair_group, kind="stable")
            bounds = np.searchsorted(pair_group[by_group], np.arange(self.n_groups + 1))
            for g in big:
                members = order[gstart[g] : gstart[g] + sizes[g]]
                pidx = by_group[bounds[g] : bounds[g + 1]]
                self.blocks.append(
                    _BlockGroup(members, local[self.pair_i[pidx]], local[self.pair_j[pidx]], pidx, min_block)
                )

    def refresh(self, X: sparse.csr_array):
        """New model values with the same sparsity pattern (a new shape on the same geometry)."""
        X = sparse.csr_array(X)
        if not same_pattern(self, X):
            raise ValueError("refresh needs the sparsity pattern the plan was built for")
        x = np.asarray(X.data, dtype=float)
        self.Xc = sparse.csr_array((x, self.Xc.indices, self.Xc.indptr), shape=self.Xc.shape)
        self.P = sparse.csr_array(
            (x[self._a] * x[self._b], self.P.indices, self.P.indptr), shape=self.P.shape
        )
        return self

    @property
    def largest_block(self) -> int:
        """The largest block of the block-solved groups (0 when there is none)."""
        return max((int(b.sizes.max()) for b in self.blocks), default=0)

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
            (T, nsrc) sources whose group system was singular (a failed block fails its whole group).
        extra_solution : numpy.ndarray
            (nsrc, m), only when ``extra`` is given.
        """
        T = F.shape[0]
        if extra is not None and T != 1:
            raise ValueError("extra right-hand sides need a batch of one frame")
        ns = self.nsrc
        Av = (self.P @ W.T).reshape(-1, T)  # (npairs, T): the normal matrices' upper triangles
        # Right-hand sides (nsrc, T, m): the data, then the background's column, then the extra ones.
        columns = [(self.Xc @ (F * W).T).reshape(ns, T) + (mu * isig2)[:, None]]
        if bg is not None:
            columns.append((self.Xc @ W.T).reshape(ns, T))
        rhs = np.stack(columns, axis=2)
        if extra is not None:
            rhs = np.concatenate([rhs, extra[:, None, :]], axis=2)
        sol = np.zeros(rhs.shape)
        var = np.zeros((ns, T))
        failed = np.zeros((ns, T), bool)
        for cl in self.classes:
            _solve_class(cl, Av, isig2, rhs, sol, var, failed)
        for block in self.blocks:
            block.solve(Av, isig2, rhs, sol, var, failed)
        w0 = sol[:, :, 0]
        bgw = bgvar = None
        if bg is not None:
            s, c = bg
            u, z = rhs[:, :, 1], sol[:, :, 1]
            denom = s - np.sum(u * z, axis=0)
            # A frame without a good pixel has no background (denom 0): NaN, and its fluxes flagged by
            # the caller as not finite.
            with np.errstate(divide="ignore", invalid="ignore"):
                bgw = (c - np.sum(u * w0, axis=0)) / denom
                bgvar = 1.0 / denom
                w0 = w0 - z * bgw[None, :]
                var = var + z * z / denom[None, :]
        if extra is not None:
            return w0.T, var.T, bgw, bgvar, failed.T, sol[:, 0, rhs.shape[2] - extra.shape[1] :]
        return w0.T, var.T, bgw, bgvar, failed.T


def _solve_class(cl, Av, isig2, rhs, sol, var, failed):
    """Solve every group of one size ``k`` (a class of :meth:`SolvePlan._build_groups`) for all frames:
    dense (groups, frames, k, k) batches, in frame passes of bounded memory."""
    k, mem = cl["k"], cl["members"]
    ng, T = mem.shape[0], rhs.shape[1]
    step = max(1, _SOLVE_CHUNK // (ng * k * k))
    for t0 in range(0, T, step):
        tt = slice(t0, min(T, t0 + step))
        nt = tt.stop - tt.start
        M = np.zeros((ng, nt, k, k))
        values = Av[cl["pidx"], tt]
        M[cl["gpos"], :, cl["li"], cl["lj"]] = values
        M[cl["gpos"], :, cl["lj"], cl["li"]] = values
        dead = _add_prior(M, isig2[mem][:, None, :])
        R = np.moveaxis(rhs[mem, tt], 2, 1) * ~dead[..., None]  # (ng, nt, k, m)
        Minv, bad = _invert(M)
        sol[mem, tt] = np.moveaxis(Minv @ R, 1, 2)
        var[mem, tt] = np.moveaxis(np.diagonal(Minv, axis1=2, axis2=3), 1, 2)
        failed[mem, tt] = np.moveaxis(dead | bad[:, :, None], 1, 2)


class _BlockGroup:
    """One large group of overlapping sources, ordered so that its normal matrix is block-tridiagonal.

    Reverse Cuthill-McKee (``scipy.sparse.csgraph.reverse_cuthill_mckee``) orders the members so that
    every pair lies close to the diagonal; blocks of consecutive members are then cut so that each block's
    pairs reach no further than the next block (a block ends where the previous block's farthest partner
    does, and is at least ``min_block`` long). With ``D_k`` the diagonal blocks and ``L_k`` the blocks
    below them, block elimination gives ``S_0 = D_0``, ``S_k = D_k - L_k S_{k-1}^-1 L_k^T``, the solution by
    forward and backward substitution, and the diagonal of the inverse by the backward recursion
    ``Sigma_k = S_k^-1 + G_k Sigma_{k+1} G_k^T`` with ``G_k = S_k^-1 L_{k+1}^T``: only blocks are ever
    inverted, all frames of a pass at once.

    Parameters
    ----------
    members : numpy.ndarray
        The group's source indices.
    li, lj : numpy.ndarray
        Each pair's members as positions in ``members`` (li <= lj as sources, any order here).
    pidx : numpy.ndarray
        The pairs' rows in the plan's pair products.
    min_block : int
        The shortest block.
    """

    def __init__(self, members, li, lj, pidx, min_block):
        n = members.size
        G = sparse.csr_array((np.ones(li.size), (li, lj)), shape=(n, n))
        perm = reverse_cuthill_mckee((G + G.T).tocsr(), symmetric_mode=True)
        rank = np.empty(n, np.int64)
        rank[perm] = np.arange(n)
        lo, hi = np.minimum(rank[li], rank[lj]), np.maximum(rank[li], rank[lj])
        reach = np.arange(n)
        np.maximum.at(reach, lo, hi)
        reach = np.maximum.accumulate(reach)  # the farthest partner of any member up to here
        starts = [0]
        while starts[-1] < n:  # a block holds every partner of the blocks before it
            s = starts[-1]
            starts.append(min(n, max(s + min_block, int(reach[s - 1]) + 1 if s else 0)))
        starts = np.asarray(starts)
        self.members = members[perm]
        self.starts = starts
        self.sizes = np.diff(starts)
        block = np.searchsorted(starts, np.arange(n), side="right") - 1
        bl, bh = block[lo], block[hi]
        if np.any(bh - bl > 1):
            raise AssertionError("block cut left a pair outside neighbouring blocks")  # cannot happen
        offset = starts[:-1]
        self.diag = []  # per block: (pair rows, local row, local column)
        self.lower = []  # per block k >= 1: L_k entries (pair rows, row in block k, column in block k - 1)
        for k in range(self.sizes.size):
            on = np.flatnonzero((bl == k) & (bh == k))
            self.diag.append((pidx[on], lo[on] - offset[k], hi[on] - offset[k]))
            if k:
                below = np.flatnonzero((bl == k - 1) & (bh == k))
                self.lower.append((pidx[below], hi[below] - offset[k], lo[below] - offset[k - 1]))

    def solve(self, Av, isig2, rhs, sol, var, failed):
        """Solve this group in every frame (writes its rows of ``sol``, ``var``, ``failed``)."""
        T, n = rhs.shape[1], self.members.size
        widest = int(self.sizes.max())
        step = max(1, _SOLVE_CHUNK // (4 * n * widest))  # frames a pass: D, S^-1, L and Sigma blocks
        for t0 in range(0, T, step):
            tt = slice(t0, min(T, t0 + step))
            x, v, bad = self._solve_frames(Av[:, tt], isig2, rhs[self.members, tt])
            sol[self.members, tt] = x
            var[self.members, tt] = v
            failed[self.members, tt] = bad

    def _solve_frames(self, Av, isig2, R):
        """One pass: ``Av`` (npairs, nt) pair values, ``R`` (n, nt, m) right-hand sides."""
        nt = R.shape[1]
        nb = self.sizes.size
        prior = isig2[self.members]
        D, L, dead = [], [None], []
        for k in range(nb):
            b0, b = self.starts[k], self.sizes[k]
            rows, i, j = self.diag[k]
            Dk = np.zeros((nt, b, b))
            Dk[:, i, j] = Av[rows].T
            Dk[:, j, i] = Av[rows].T
            dead.append(_add_prior(Dk, prior[b0 : b0 + b]))
            D.append(Dk)
            if k:
                rows, i, j = self.lower[k - 1]
                Lk = np.zeros((nt, b, self.sizes[k - 1]))
                Lk[:, i, j] = Av[rows].T
                L.append(Lk)
        Rt = np.moveaxis(R, 1, 0) * ~np.concatenate(dead, axis=1)[..., None]  # (nt, n, m)
        bad = np.zeros(nt, bool)
        Sinv, Y = [], []
        for k in range(nb):
            b0, b1 = self.starts[k], self.starts[k + 1]
            S, y = D[k], Rt[:, b0:b1]
            if k:
                LS = L[k] @ Sinv[k - 1]
                S = S - LS @ np.swapaxes(L[k], 1, 2)
                y = y - LS @ Y[k - 1]
            inv, failed = _invert(S)
            bad |= failed
            Sinv.append(inv)
            Y.append(y)
        X = np.empty_like(Rt)
        V = np.empty((nt, self.members.size))
        x = Sinv[-1] @ Y[-1]
        sigma = Sinv[-1]
        for k in range(nb - 1, -1, -1):
            b0, b1 = self.starts[k], self.starts[k + 1]
            if k < nb - 1:
                Gk = Sinv[k] @ np.swapaxes(L[k + 1], 1, 2)
                x = Sinv[k] @ Y[k] - Gk @ x
                sigma = Sinv[k] + Gk @ sigma @ np.swapaxes(Gk, 1, 2)
            X[:, b0:b1] = x
            V[:, b0:b1] = np.diagonal(sigma, axis1=1, axis2=2)
        bad |= ~np.isfinite(X).all(axis=(1, 2)) | ~np.isfinite(V).all(axis=1)
        flagged = np.concatenate(dead, axis=1) | bad[:, None]  # a failed block fails its whole group
        return np.moveaxis(X, 0, 1), V.T, flagged.T


def _add_prior(M, prior):
    """Add the prior precisions to the diagonals of a stack of normal matrices (..., k, k). A source with
    neither a good pixel nor a prior (a zero diagonal: its whole row is zero) gets 1 there, decoupled, no
    information; returns where (..., k)."""
    d = np.arange(M.shape[-1])
    M[..., d, d] += prior
    dead = M[..., d, d] == 0
    M[..., d, d] += dead
    return dead


def _invert(M):
    """Invert a stack of matrices (..., k, k); those singular or with a non-finite inverse give NaN and are
    reported (..., bool)."""
    try:
        inv = np.linalg.inv(M)
    except np.linalg.LinAlgError:  # one singular matrix fails the whole batch: one at a time
        inv = np.full_like(M, np.nan)
        for index in np.ndindex(M.shape[:-2]):
            try:
                inv[index] = np.linalg.inv(M[index])
            except np.linalg.LinAlgError:
                pass
    return inv, ~np.isfinite(inv).all(axis=(-2, -1))


def same_pattern(plan, X) -> bool:
    indptr, indices = plan._pattern
    return (
        X.indptr.shape == indptr.shape
        and X.indices.shape == indices.shape
        and np.array_equal(X.indptr, indptr)
        and np.array_equal(X.indices, indices)
    )


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
