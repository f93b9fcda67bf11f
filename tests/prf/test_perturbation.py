"""The PRF time model, part 2 (photref_core.prf.perturbation): the perturbation of the PRF's shape.

The basis is checked against scipy's B-splines one element at a time, the time bins against their rules,
and the whole model against simulated fields with known truth: a focus change (the core's FWHM 10 % wider
over 40 frames) with drift must reach the time scatter of the true PRF at the true positions (the oracle),
and on a field without a focus change the perturbation must change nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import BSpline

from photref_core.prf.metrics import perturbed_ratios
from photref_core.prf.model import PRFModel
from photref_core.prf.parameters import PRFParameters
from photref_core.prf.perturbation import (
    DEGREE,
    MIN_BINS_PER_TERM,
    TIME_POLY_ORDER,
    Perturbation,
    cartesian_knots,
    spatial_design,
    time_bins,
)
from photref_core.simulate.fields import (
    load_frames,
    oracle_fit,
    score_fluxes,
    simulate_field,
    time_scatter,
    true_fluxes,
)


def test_knots_are_clamped_and_denser_in_the_core():
    k = cartesian_knots(8.0, 10)
    assert k.size == 10 + 2 * DEGREE
    assert np.all(k[: DEGREE + 1] == -8.0) and np.all(k[-DEGREE - 1 :] == 8.0)
    inner = np.diff(k[DEGREE:-DEGREE])
    assert inner[inner.size // 2] < inner[0]  # "sqrt" spacing
    np.testing.assert_allclose(k, -k[::-1])


@settings(max_examples=40, deadline=None)
@given(
    xi=st.floats(-12.0, 12.0),
    eta=st.floats(-12.0, 12.0),
    nknots=st.integers(2, 12),
)
def test_spatial_design_is_the_tensor_product_of_scipy_bsplines(xi, eta, nknots):
    knots = cartesian_knots(8.0, nknots)
    nside = knots.size - DEGREE - 1
    d = spatial_design(np.array([xi]), np.array([eta]), knots).toarray()[0]
    # The reference: every basis element on its own, at the offsets clamped into the box.
    cx, cy = np.clip(xi, -8.0, 8.0), np.clip(eta, -8.0, 8.0)
    bx = [BSpline.basis_element(knots[i : i + DEGREE + 2], extrapolate=False) for i in range(nside)]
    vx = np.nan_to_num([b(cx) for b in bx])
    vy = np.nan_to_num([b(cy) for b in bx])
    # basis_element is open on the right: the last function at the box's right edge is 1 there.
    if cx == 8.0:
        vx[-1] = 1.0
    if cy == 8.0:
        vy[-1] = 1.0
    if abs(xi) > 8.0 or abs(eta) > 8.0:  # no perturbation outside the box
        assert not np.any(d)
        return
    np.testing.assert_allclose(d, np.outer(vx, vy).ravel(), atol=1e-12)
    assert d.sum() == pytest.approx(1.0)  # a partition of unity: v = 0 is "no perturbation"


def test_time_bins_follow_their_rules():
    # Few frames: one frame a bin up to 12 bins (3 per time term of a cubic), never one bin.
    bins, basis = time_bins(np.arange(5.0), 200)
    assert [b.tolist() for b in bins] == [[0], [1], [2], [3], [4]]
    assert basis.orders.tolist() == [3]
    floor = MIN_BINS_PER_TERM * (TIME_POLY_ORDER + 1)
    bins, _ = time_bins(np.arange(40.0), 200)
    assert len(bins) == floor and sorted(np.concatenate(bins).tolist()) == list(range(40))
    bins, _ = time_bins(np.arange(5000.0), 200)
    assert len(bins) == 25 and all(b.size == 200 for b in bins)
    # Two frames: one bin each, a line in time.
    _, basis = time_bins(np.array([0.0, 1.0]), 200)
    assert basis.orders.tolist() == [1]
    # A gap of more than 5 cadences starts a segment, with its own time vectors.
    t = np.concatenate([np.arange(20.0), 100 + np.arange(20.0)])
    bins, basis = time_bins(t[::-1], 4)  # any order in, time order out
    assert basis.segments.shape[0] == 2 and basis.nterms == 8
    assert all(np.ptp(t[::-1][b]) < 50 for b in bins)
    v_first, v_second = basis.vector(5.0), basis.vector(110.0)
    assert np.all(v_first[4:] == 0) and np.all(v_second[:4] == 0) and v_first[0] == v_second[4] == 1
    # Outside the frames' range the time is clipped to the nearest segment's bins: no extrapolation.
    np.testing.assert_array_equal(basis.vector(-50.0), basis.vector(basis.segments[0, 0]))
    np.testing.assert_array_equal(basis.vector(1e6), basis.vector(basis.segments[1, 1]))


def _focus_field(tmp_path, focus, cosmic_rays=0):
    sim = simulate_field(
        tmp_path,
        "kepler",
        seed=1,
        n_frames=40,
        n_stars=100,
        size=96,
        drift=0.5,
        scale_drift=0.25 / 96 * 2,
        focus_change=focus,
    )
    flux, err, mask, wcs = load_frames(sim["paths"])
    truth, cat = Table.read(sim["truth"]), Table.read(sim["catalog"])
    ns = len(cat)
    pair, edge = np.asarray(truth["pair_id"][:ns]), np.asarray(truth["edge"][:ns])
    oracle, _ = oracle_fit(sim, flux, err, mask)
    # Cosmic rays in the frames the model is built on (not in those fitted after), on pixels next to the
    # cores of the brightest isolated stars, one a frame.
    build_flux = flux.copy()
    x, y = np.asarray(truth["x"][:ns]), np.asarray(truth["y"][:ns])
    bright = np.argsort(-np.asarray(truth["mean_flux"][:ns]) * ((pair < 0) & ~edge))[:cosmic_rays]
    for k, i in enumerate(bright):
        t = 2 + 3 * k
        py, px = int(round(y[i])), int(round(x[i]) + 1)
        build_flux[t, py, px] += 100 * err[t, py, px]
    times = 2460000.5 + 0.02 * np.arange(40)  # the simulated frames' JD
    params = PRFParameters(**sim["prf_params"], time_model=True, time_build_frames=6, perturbation=True)
    model = PRFModel.build(
        build_flux, err, wcs, cat["ra"], cat["dec"], cat["flux"], params=params, mask=mask, times=times
    )
    return dict(
        sim=sim,
        frames=(flux, err, mask, wcs),
        times=times,
        model=model,
        pair=pair,
        edge=edge,
        oracle=time_scatter(oracle, true_fluxes(sim), pair, edge),
        true=true_fluxes(sim, sim["prf_params"]["rmax"]),
    )


def _without_perturbation(model, *frames, times):
    pert = model.time_model.perturbation
    model.time_model.perturbation = None
    try:
        return model.fit(*frames, times=times)
    finally:
        model.time_model.perturbation = pert


def test_perturbation_follows_a_focus_change_to_the_oracle(tmp_path):
    case = _focus_field(tmp_path, focus=0.10, cosmic_rays=6)
    flux, err, mask, wcs = case["frames"]
    model, times = case["model"], case["times"]
    fitted = model.fit(flux, err, mask, wcs, times=times)
    moved_only = _without_perturbation(model, flux, err, mask, wcs, times=times)
    ratio = time_scatter(fitted.flux, case["true"], case["pair"], case["edge"]) / case["oracle"]
    ratio_moved = time_scatter(moved_only.flux, case["true"], case["pair"], case["edge"]) / case["oracle"]
    score = score_fluxes(fitted.flux, fitted.flux_err, case["true"], case["pair"], case["edge"])
    # The focus change does hurt the transform alone (measured 1.19x, chi std 1.8); the perturbation
    # brings it to the oracle (measured 1.01x, chi std 1.04).
    assert ratio_moved > 1.12
    assert ratio <= 1.10
    assert 0.8 <= score["isolated_chi_std"] <= 1.25
    diag = model.time_model.perturbation.diagnostics
    assert diag["bins"] == 12 and diag["frames"] == 40
    # The cosmic rays of the build frames (each averaged with 2-3 other frames in its bin) are clipped.
    assert sum(diag["clipped"]) >= 6
    assert diag["points_used"] < diag["points"]
    assert diag["sources_variable"] >= 3  # the field's variable stars are left out of the fit
    # A wider core at the end: less light at the centre than at the start.
    centre = [float(_core_factor(model.time_model.perturbation, t)[24]) for t in (times[0], times[-1])]
    print("P at the centre, first and last frame:", centre)
    assert centre[1] / centre[0] < 0.95
    # Saved and loaded, the perturbation gives the same fluxes; without the times it cannot be applied.
    back = PRFModel.load(model.save(tmp_path / "m.npz"))
    a = model.fit(flux[:4], err[:4], mask[:4], wcs[:4], times=times[:4])
    b = back.fit(flux[:4], err[:4], mask[:4], wcs[:4], times=times[:4])
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(back.time_model.perturbation.weights, model.time_model.perturbation.weights)
    with pytest.raises(ValueError, match="times"):
        model.fit(flux[:2], err[:2], mask[:2], wcs[:2])


def test_perturbation_changes_nothing_without_a_focus_change(tmp_path):
    case = _focus_field(tmp_path, focus=0.0)
    flux, err, mask, wcs = case["frames"]
    model, times = case["model"], case["times"]
    fitted = model.fit(flux, err, mask, wcs, times=times)
    moved_only = _without_perturbation(model, flux, err, mask, wcs, times=times)
    s = time_scatter(fitted.flux, case["true"], case["pair"], case["edge"])
    s_moved = time_scatter(moved_only.flux, case["true"], case["pair"], case["edge"])
    assert s <= 1.02 * s_moved  # measured 0.98x
    pert = model.time_model.perturbation
    # Its size over the core (1.5 pixels around the source) at the first and last frame's time.
    assert max(np.max(np.abs(_core_factor(pert, t) - 1)) for t in (times[0], times[-1])) < 0.02


def _core_factor(pert, time):
    """P on a grid within 1.5 Kepler-like pixels (6") of the source."""
    g = np.linspace(-6.0, 6.0, 7)
    xi, eta = (a.ravel() for a in np.meshgrid(g, g))
    return pert.factor(xi, eta, time)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(perturbation=True), "perturbation needs time_model"),
        (dict(time_model=True, perturbation="yes"), "perturbation must be a bool"),
        (dict(time_radius=0.0), "time_radius"),
        (dict(time_nknots=1), "time_nknots"),
        (dict(time_resolution=0), "time_resolution"),
    ],
)
def test_perturbation_parameters_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        PRFParameters(**bad)


def _small_time_model(tmp_path):
    sim = simulate_field(tmp_path, "kepler", seed=3, n_frames=4, n_stars=30, size=48, drift=0.2)
    flux, err, mask, wcs = load_frames(sim["paths"])
    cat = Table.read(sim["catalog"])
    params = PRFParameters(
        **sim["prf_params"], time_model=True, time_rounds=0, time_build_frames=2, refine_iterations=3
    )
    return PRFModel.build(flux, err, wcs, cat["ra"], cat["dec"], cat["flux"], params=params, mask=mask)


def test_perturbed_metrics_on_a_known_perturbation(tmp_path):
    model = _small_time_model(tmp_path)
    # A time model without a perturbation: the perturbed model is the model (1 and 0, not None).
    plain = model.get_psf_metrics()
    np.testing.assert_array_equal(plain.perturbed_ratio_mean, np.ones(model.nsources))
    np.testing.assert_array_equal(plain.perturbed_std, np.zeros(model.nsources))
    # P - 1 = c z(t) everywhere in a box that holds every source's disc: each source's ratio is 1 + c z(t).
    times = np.linspace(10.0, 11.0, 9)
    _, basis = time_bins(times, 200)
    rmax = model.params.rmax
    side = cartesian_knots(rmax, 5).size - DEGREE - 1
    weights = np.zeros((side * side, basis.nterms))
    weights[:, 1] = 0.03
    model.time_model.perturbation = Perturbation(
        rmax * 1.01, 5, basis, weights, {"bin_times": times.tolist()}
    )
    m = model.get_psf_metrics()
    z = (times - 10.5) / 0.5
    np.testing.assert_allclose(m.perturbed_ratio_mean, 1.0 + 0.03 * z.mean(), atol=1e-12)
    np.testing.assert_allclose(m.perturbed_std, 0.03 * z.std(), rtol=1e-9)
    # Random weights: the ratios equal the sums over each source's pairs, one source at a time.
    rng = np.random.default_rng(0)
    model.time_model.perturbation.weights = rng.normal(0, 0.05, weights.shape)
    model.time_model.perturbation.radius = 0.5 * rmax  # part of each disc outside the box: P = 1 there
    ratios, used = perturbed_ratios(model, times=times[[0, 4, 8]])
    from photref_core.prf.timemodel import _frame_pairs, moved_geometry

    tmod = model.time_model
    pairs = _frame_pairs(model, tmod.shape, model.wcs, model.image_shape)
    a = tmod.start(None)
    vals, _ = pairs.values(tmod.shape, a)
    mg = moved_geometry(pairs.geom, *pairs.shifts(a))
    for k, t in enumerate(used):
        for i in range(model.nsources):
            own = mg.src == i
            p = tmod.perturbation.factor(mg.xi[own], mg.eta[own], t)
            assert ratios[k, i] == pytest.approx(np.sum(vals[own] * p) / np.sum(vals[own]), rel=1e-10)
    assert np.ptp(ratios) > 1e-3
    # Without a time model, no perturbed metrics; the sub-sampling is psfmachine's npoints_per_pixel.
    model.time_model = None
    m = model.get_psf_metrics(npoints_per_pixel=10)
    assert m.perturbed_ratio_mean is None and m.perturbed_std is None
    assert np.all((m.source_psf_fraction > 0.9) & (m.source_psf_fraction < 1.01))
    coarse = model.get_psf_metrics(npoints_per_pixel=1).source_psf_fraction
    assert np.any(coarse != m.source_psf_fraction)  # the disc's edge pixels are sub-sampled
    with pytest.raises(ValueError, match="npoints_per_pixel"):
        model.get_psf_metrics(npoints_per_pixel=0)
