"""photref_core.prf.fluxfit: flags, bad pixels, and the grouped solve against a dense reference."""

from __future__ import annotations

import numpy as np
import pytest
from prfutil import MAIN_PARAMS, isolated, setup_field

from photref_core.prf import solver as prf_solver
from photref_core.prf.solver import FLAG_LOW_COVERAGE


def test_edge_star_half_outside_is_flagged(main):
    res = main["res"]
    edge = np.flatnonzero(main["edge"])
    inside, outside = edge[0], edge[1]  # centred 1 px inside the frame / 2.5 FWHM outside
    assert np.all(res.flag[:, outside] & FLAG_LOW_COVERAGE)
    assert np.all(np.isnan(res.flux[:, outside])) and np.all(np.isnan(res.flux_err[:, outside]))
    assert np.all(res.good_fraction[:, outside] < 0.5)
    assert np.all(res.flag[:, inside] == 0)
    assert np.all(res.good_fraction[:, inside] > 0.5)
    ref = main["true"][:, inside] * main["ee"]
    chi = (res.flux[:, inside] - ref) / res.flux_err[:, inside]
    assert abs(chi.mean()) < 1.5


def test_masked_and_nonfinite_pixels(main):
    m, iso = main["model"], isolated(main)
    flux, err, mask = main["flux"][:2].copy(), main["err"][:2].copy(), main["mask"][:2].copy()
    star = np.flatnonzero(iso)[np.argmax(main["true"][0, iso])]  # the brightest isolated star
    x, y = int(round(main["x"][star])), int(round(main["y"][star]))
    base = m.fit(flux, err, mask=mask)
    # Hot pixels under the core, flagged in the mask: ignored (the flux stays right, the error grows).
    flux[0, y - 1 : y + 1, x - 1 : x + 1] = 1e6
    mask[0, y - 1 : y + 1, x - 1 : x + 1] = True
    res = m.fit(flux, err, mask=mask)
    ref = main["true"][0, star] * main["ee"]
    assert res.flag[0, star] == 0
    assert abs(res.flux[0, star] - ref) < 4 * res.flux_err[0, star]
    assert res.flux_err[0, star] > base.flux_err[0, star]
    # Non-finite data are bad pixels too: the same answer as masking them.
    flux2 = flux.copy()
    flux2[0][mask[0] & ~main["mask"][0]] = np.nan
    res2 = m.fit(flux2, err, mask=main["mask"][:2])
    np.testing.assert_allclose(res2.flux[0], res.flux[0], rtol=1e-12, equal_nan=True)
    # Less than half of the model on good pixels: NaN flux and the flag; the other stars do not move.
    yy, xx = np.mgrid[0 : flux.shape[1], 0 : flux.shape[2]]
    core = np.hypot(xx - main["x"][star], yy - main["y"][star]) < 3.0
    mask[0] |= core
    res = m.fit(flux, err, mask=mask)
    assert res.good_fraction[0, star] < 0.5
    assert res.flag[0, star] & FLAG_LOW_COVERAGE and np.isnan(res.flux[0, star])
    others = np.arange(m.nsources) != star
    np.testing.assert_allclose(res.flux[0, others], base.flux[0, others], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res.flux[1], base.flux[1], rtol=1e-12, equal_nan=True)


def dense_reference(model, flux, err, mask, fit_background):
    """Plain-numpy full-matrix solve of SPEC 6's system for one frame (what psfmachine does)."""
    X = model.mean_model.toarray().T  # (npix, nsrc)
    f, e = flux.ravel(), err.ravel()
    good = np.isfinite(f) & np.isfinite(e) & (e > 0) & ~mask.ravel()
    if fit_background:
        X = np.hstack([X, np.ones((X.shape[0], 1))])
    Xg, fg, wg = X[good], f[good], 1.0 / e[good] ** 2
    prec = np.concatenate([1 / model.prior_sigma**2, [0.0] * fit_background])
    mu = np.concatenate([model.prior_mu, [0.0] * fit_background])
    M = Xg.T @ (Xg * wg[:, None]) + np.diag(prec)
    w = np.linalg.solve(M, Xg.T @ (wg * fg) + prec * mu)
    return w, np.sqrt(np.diag(np.linalg.inv(M)))


@pytest.mark.parametrize("solver", ["groups", "blocks"])
@pytest.mark.parametrize("fit_background", [False, True])
def test_grouped_solution_equals_dense_solve(tmp_path, fit_background, solver, monkeypatch):
    if solver == "blocks":  # every group of 2+ sources through the block elimination, blocks of 1+
        monkeypatch.setattr(prf_solver, "BLOCK_MIN_GROUP", 1)
        monkeypatch.setattr(prf_solver, "MIN_BLOCK", 1)
    sim_kw = dict(
        n_frames=3, n_stars=14, size=90, pixscale=0.11, seed=5, n_pairs=3, n_edge=2, min_separation=8
    )
    f = setup_field(tmp_path, sim_kw, dict(MAIN_PARAMS, fit_background=fit_background))
    m = f["model"]
    plan = m.frames.plan()
    assert plan.n_groups < m.nsources  # overlapping groups exist
    assert bool(plan.blocks) == (solver == "blocks")
    flux = f["flux"]
    res = m.fit(flux, f["err"], mask=f["mask"], return_model=True)
    for t in range(flux.shape[0]):
        w, werr = dense_reference(m, flux[t], f["err"][t], f["mask"][t], fit_background)
        ok = res.flag[t] == 0
        assert ok.sum() >= m.nsources - 2
        np.testing.assert_allclose(res.flux[t, ok], w[: m.nsources][ok], rtol=1e-8)
        np.testing.assert_allclose(res.flux_err[t, ok], werr[: m.nsources][ok], rtol=1e-8)
        if fit_background:
            assert res.background[t] == pytest.approx(w[-1], rel=1e-8)
            assert res.background_err[t] == pytest.approx(werr[-1], rel=1e-8)
        # The model image is X w (+ background).
        ws = w[: m.nsources]
        expect = m.mean_model.T @ ws + (w[-1] if fit_background else 0.0)
        np.testing.assert_allclose(res.model[t].ravel(), expect, rtol=1e-8, atol=1e-9 * np.abs(expect).max())
    # Big groups are solved a few frames at a time (bounded memory): same answer.
    monkeypatch.setattr(prf_solver, "_SOLVE_CHUNK", 1)
    chunked = m.fit(flux, f["err"], mask=f["mask"])
    np.testing.assert_allclose(chunked.flux, res.flux, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(chunked.flux_err, res.flux_err, rtol=1e-12, equal_nan=True)
    if fit_background:
        # A constant added to the frames goes into the background, exactly; the fluxes do not move.
        shifted = m.fit(flux + 7.5, f["err"], mask=f["mask"])
        np.testing.assert_allclose(shifted.background - res.background, 7.5, rtol=1e-9)
        np.testing.assert_allclose(shifted.flux, res.flux, rtol=1e-9, equal_nan=True)


def test_extra_right_hand_sides_are_solved_with_the_frame_normal_matrix():
    """SolvePlan.solve's ``extra`` (the time model's flux-transform coupling) equals a dense solve with the
    frame's flux normal matrix, groups and dead sources included; more than one frame is refused."""
    from scipy import sparse

    rng = np.random.default_rng(5)
    ns, npix = 7, 40
    X = np.zeros((ns, npix))
    for i, (lo, hi) in enumerate([(0, 8), (5, 12), (10, 16), (20, 28), (24, 31), (33, 38), (38, 40)]):
        X[i, lo:hi] = rng.uniform(0.1, 1.0, hi - lo)
    X[6] = 0.0  # a source with no model pixel and no prior: dead
    X[6, 39] = 1e-300
    plan = prf_solver.SolvePlan(sparse.csr_array(X))
    W = rng.uniform(0.5, 2.0, (1, plan.pix_u.size))
    W[0, -1] = 0.0
    F = rng.normal(size=(1, plan.pix_u.size))
    isig2 = np.where(np.arange(ns) == 6, 0.0, 1e-3)
    extra = rng.normal(size=(ns, 3))
    *_, solved = plan.solve(F, W, np.zeros(ns), isig2, extra=extra)
    Xu = X[:, plan.pix_u]
    A = (Xu * W[0]) @ Xu.T + np.diag(isig2)
    live = np.arange(6)
    np.testing.assert_allclose(solved[live], np.linalg.solve(A[np.ix_(live, live)], extra[live]), rtol=1e-9)
    np.testing.assert_array_equal(solved[6], 0.0)
    with pytest.raises(ValueError, match="one frame"):
        plan.solve(np.vstack([F, F]), np.vstack([W, W]), np.zeros(ns), isig2, extra=extra)
