"""photref_core.prf.solver: the block-tridiagonal path for large groups against a dense reference.

The plan solves groups of at most ``block_min_group`` sources as dense batches and larger ones block by
block (reverse Cuthill-McKee order, block elimination, the diagonal of the inverse by a backward
recursion). Both must give the dense answer of SPEC 6's system, whatever the overlaps, bad pixels,
priors, background and extra right-hand sides.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import sparse

from photref_core.prf.solver import SolvePlan


def random_field(rng, ns, npix, max_width, chain):
    """(ns x npix) model: each source a random window of pixels; ``chain`` lays them out along the pixel
    axis in a random order, so that overlaps chain them into large groups with a small bandwidth."""
    X = np.zeros((ns, npix))
    centres = np.sort(rng.uniform(0, npix, ns)) if chain else rng.uniform(0, npix, ns)
    centres = rng.permutation(centres)  # source order unrelated to position: RCM must find the band
    for i, c in enumerate(centres):
        half = rng.integers(1, max_width + 1)
        lo, hi = int(max(0, c - half)), int(min(npix, c + half + 1))
        X[i, lo:hi] = rng.uniform(0.05, 1.0, hi - lo)
    return X


def dense_solution(X, W, F, mu, isig2, bg, extra):
    """SPEC 6's system for one frame, with numpy on the full matrix; dead sources (no good pixel, no
    prior) dropped. Returns fluxes, variances, background, its variance, the extra solutions, live."""
    A = (X * W) @ X.T + np.diag(isig2)
    live = np.diag(A) > 0
    Xl = X[live]
    ns_l = Xl.shape[0]
    M = A[np.ix_(live, live)]
    b = Xl @ (W * F) + (mu * isig2)[live]
    extra_sol = np.linalg.solve(M, extra[live]) if extra is not None else None
    if bg:
        u = Xl @ W
        M = np.block([[M, u[:, None]], [u[None, :], np.array([[W.sum()]])]])
        b = np.concatenate([b, [W @ F]])
    sol = np.linalg.solve(M, b)
    cov = np.linalg.inv(M)
    var = np.diag(cov)
    return sol[:ns_l], var[:ns_l], (sol[-1] if bg else None), (var[-1] if bg else None), extra_sol, live


@settings(max_examples=40, deadline=None)
@example(  # every source dead in a frame (found by the suite): no live system to compare with
    seed=43622, ns=2, max_width=1, block_min_group=1, min_block=1, chain=False, bg=False, with_extra=False
)
@given(
    seed=st.integers(0, 2**32 - 1),
    ns=st.integers(2, 45),
    max_width=st.integers(1, 6),
    block_min_group=st.sampled_from([1, 4, 1000]),
    min_block=st.integers(1, 6),
    chain=st.booleans(),
    bg=st.booleans(),
    with_extra=st.booleans(),
)
def test_plan_solution_equals_dense_solve(
    seed, ns, max_width, block_min_group, min_block, chain, bg, with_extra
):
    rng = np.random.default_rng(seed)
    npix = int(rng.integers(ns, 4 * ns + 2))
    X = random_field(rng, ns, npix, max_width, chain)
    X[rng.integers(ns)] = 0.0  # a source without any model pixel: dead unless it has a prior
    plan = SolvePlan(sparse.csr_array(X), block_min_group=block_min_group, min_block=min_block)
    T = 1 if with_extra else 3
    Xu = X[:, plan.pix_u]
    nu = plan.pix_u.size
    W = rng.uniform(0.2, 3.0, (T, nu)) * (rng.uniform(size=(T, nu)) > 0.15)  # some bad pixels
    F = rng.normal(5.0, 2.0, (T, nu)) * (W > 0)
    isig2 = np.where(rng.uniform(size=ns) < 0.3, 0.0, rng.uniform(1e-4, 1e-2, ns))
    mu = rng.uniform(1.0, 10.0, ns)
    extra = rng.normal(size=(ns, 2)) if with_extra else None
    bg_sums = (W.sum(axis=1), (W * F).sum(axis=1)) if bg else None
    out = plan.solve(F, W, mu, isig2, bg_sums, extra)
    w, var, bgw, bgvar, failed = out[:5]
    for t in range(T):
        A = (Xu * W[t]) @ Xu.T + np.diag(isig2)
        if not (np.diag(A) > 0).any():  # every source dead in this frame: all reported, nothing to solve
            assert failed[t].all()
            continue
        if (
            bg
            and np.linalg.cond(np.block([[A, (Xu @ W[t])[:, None]], [(Xu @ W[t])[None], W[t].sum()]])) > 1e10
        ):
            continue  # the background and a source are degenerate on this draw: nothing to compare
        if np.linalg.cond(A[np.ix_(np.diag(A) > 0, np.diag(A) > 0)]) > 1e10:
            continue
        ref_w, ref_var, ref_bg, ref_bgvar, ref_extra, live = dense_solution(
            Xu, W[t], F[t], mu, isig2, bg, extra
        )
        np.testing.assert_array_equal(failed[t], ~live)  # dead sources are the only failures
        np.testing.assert_allclose(w[t, live], ref_w, rtol=1e-7, atol=1e-7 * np.abs(ref_w).max())
        np.testing.assert_allclose(var[t, live], ref_var, rtol=1e-7, atol=1e-12 * np.abs(ref_var).max())
        if bg:
            assert bgw[t] == pytest.approx(ref_bg, rel=1e-7, abs=1e-7 * np.abs(ref_w).max())
            assert bgvar[t] == pytest.approx(ref_bgvar, rel=1e-7)
        if with_extra:
            np.testing.assert_allclose(
                out[5][live], ref_extra, rtol=1e-7, atol=1e-7 * np.abs(ref_extra).max()
            )
            np.testing.assert_array_equal(out[5][~live], 0.0)


def test_crowded_chain_is_solved_by_blocks_not_one_dense_matrix():
    """300 sources in one chain of overlaps: one group, solved in blocks much smaller than the group,
    with the dense answer."""
    rng = np.random.default_rng(3)
    ns, npix = 300, 600
    X = np.zeros((ns, npix))
    for i, c in enumerate(rng.permutation(np.arange(ns) * 2)):  # every 2 px, 9-13 px wide
        half = int(rng.integers(4, 7))
        X[i, max(0, c - half) : c + half + 1] = rng.uniform(
            0.05, 1.0, min(c + half + 1, npix) - max(0, c - half)
        )
    plan = SolvePlan(sparse.csr_array(X), block_min_group=64)
    assert plan.n_groups == 1
    assert plan.blocks and plan.largest_block < plan.group_sizes.max() / 4
    nu = plan.pix_u.size
    W = rng.uniform(0.5, 2.0, (4, nu))
    F = rng.normal(10.0, 1.0, (4, nu))
    isig2 = np.full(ns, 1e-3)
    w, var, _, _, failed = plan.solve(F, W, np.zeros(ns), isig2)
    Xu = X[:, plan.pix_u]
    for t in range(4):
        A = (Xu * W[t]) @ Xu.T + np.diag(isig2)
        np.testing.assert_allclose(w[t], np.linalg.solve(A, Xu @ (W[t] * F[t])), rtol=1e-9)
        np.testing.assert_allclose(var[t], np.diag(np.linalg.inv(A)), rtol=1e-9)
    assert not failed.any()


@pytest.mark.parametrize("block_min_group", [1, 1000])
def test_a_singular_group_fails_whole_and_alone(block_min_group):
    """Two sources with the same model and no prior make their group's system singular: every source of
    that group is reported failed in that frame; the other group, and the same group in a frame where
    the pair has no good pixel (then only the pair is dead), are solved."""
    rng = np.random.default_rng(1)
    ns, npix = 12, 60
    X = np.zeros((ns, npix))
    for i in range(6):  # group one: a chain over pixels 0-29
        X[i, 4 * i : 4 * i + 10] = rng.uniform(0.1, 1.0, 10)
    X[1] = X[2]  # the degenerate pair, pixels 8-17
    for i in range(6, ns):  # group two: a chain over pixels 32-58
        X[i, 32 + 4 * (i - 6) : 32 + 4 * (i - 6) + 7] = rng.uniform(0.1, 1.0, 7)
    plan = SolvePlan(sparse.csr_array(X), block_min_group=block_min_group, min_block=2)
    assert plan.n_groups == 2
    W = np.ones((2, plan.pix_u.size))
    W[1, (plan.pix_u >= 8) & (plan.pix_u < 18)] = 0.0  # frame 1: no good pixel for the pair
    F = rng.normal(5.0, 1.0, W.shape) * (W > 0)
    w, var, _, _, failed = plan.solve(F, W, np.zeros(ns), np.zeros(ns))
    assert failed[0, :6].all()
    assert not failed[0, 6:].any() and np.isfinite(w[0, 6:]).all() and (var[0, 6:] > 0).all()
    np.testing.assert_array_equal(failed[1], np.isin(np.arange(ns), [1, 2]))
    assert np.isfinite(w[1]).all()
