"""The PRF time model, part 1 (photref_core.prf.timemodel): per-frame transforms and the re-centred shape.

The derivatives are checked against finite differences, the moved geometry against one built at the moved
positions, and the whole model against simulated drifting fields with known truth: the fluxes must reach
the time scatter of the true PRF at the true positions (the oracle), the transforms the true displacements.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from hypothesis import given, settings
from hypothesis import strategies as st

from photref_core.prf.geometry import build_geometry
from photref_core.prf.model import PRFModel
from photref_core.prf.parameters import TRANSFORM_TERMS, PRFParameters
from photref_core.prf.shape import ShapeModel
from photref_core.prf.timemodel import (
    _FramePairs,
    moved_geometry,
    shape_centroid,
    source_shifts,
)
from photref_core.simulate.fields import (
    load_frames,
    oracle_fit,
    score_fluxes,
    simulate_field,
    time_scatter,
    transform_error,
    true_fluxes,
)
from photref_core.simulate.images import make_wcs

_SHAPE = ShapeModel(10, 15, 0.1, 2.0, 0.2)
_WEIGHTS = np.random.default_rng(1).normal(size=_SHAPE.nbasis) * 0.3 - np.repeat(
    np.linspace(0, 3, _SHAPE.n_radial),
    [1] * _SHAPE.n_cut + [_SHAPE.n_phi_knots] * (_SHAPE.n_radial - _SHAPE.n_cut),
)


def _shape():
    return ShapeModel(10, 15, 0.1, 2.0, 0.2, weights=_WEIGHTS)


@settings(max_examples=30, deadline=None)
@given(r=st.floats(1e-3, 2.0 - 1e-3), phi=st.floats(-10.0, 10.0))
def test_log_value_gradient_matches_finite_differences(r, phi):
    sm = _shape()
    s, s_r, s_phi = sm.log_value_gradient(np.array([r]), np.array([phi]))
    assert s[0] == pytest.approx(sm.log_value(np.array([r]), np.array([phi]))[0], abs=1e-12)
    h = 1e-6
    fd_r = (sm.log_value(np.array([r + h]), [phi]) - sm.log_value(np.array([r - h]), [phi]))[0] / (2 * h)
    fd_phi = (sm.log_value(np.array([r]), [phi + h]) - sm.log_value(np.array([r]), [phi - h]))[0] / (2 * h)
    assert s_r[0] == pytest.approx(fd_r, rel=1e-5, abs=1e-5)
    assert s_phi[0] == pytest.approx(fd_phi, rel=1e-5, abs=1e-5)


def _field_geometry(n=12, size=48, seed=0):
    rng = np.random.default_rng(seed)
    wcs = make_wcs(size, 0.11, 150.0, 60.0, 15.0)
    x, y = rng.uniform(8, size - 8, n), rng.uniform(8, size - 8, n)
    ra, dec = wcs.all_pix2world(x, y, 0)
    return wcs, (size, size), ra, dec, x, y


def test_moved_geometry_matches_a_geometry_built_at_the_moved_positions():
    wcs, shape, ra, dec, x, y = _field_geometry()
    g = build_geometry(wcs, shape, ra, dec, 2.0)
    sx, sy = np.linspace(-0.4, 0.5, x.size), np.linspace(0.3, -0.2, x.size)
    moved = moved_geometry(g, sx, sy)
    ra2, dec2 = wcs.all_pix2world(x + sx, y + sy, 0)
    g2 = build_geometry(wcs, shape, ra2, dec2, 3.0)
    # The same (source, pixel) pairs in the wider geometry built at the moved positions.
    key2 = {(int(s), int(p)): k for k, (s, p) in enumerate(zip(g2.src, g2.pix, strict=True))}
    idx = np.array([key2[(int(s), int(p))] for s, p in zip(g.src, g.pix, strict=True)])
    # The local Jacobian is exact to the TAN projection's curvature over ~20 px: micro-arcsec.
    np.testing.assert_allclose(moved.xi, g2.xi[idx], atol=2e-5)
    np.testing.assert_allclose(moved.eta, g2.eta[idx], atol=2e-5)
    np.testing.assert_allclose(moved.r, g2.r[idx], atol=2e-5)


@pytest.mark.parametrize("kind", sorted(TRANSFORM_TERMS))
def test_pair_derivatives_match_finite_differences(kind):
    wcs, shape, ra, dec, _, _ = _field_geometry(seed=2)
    sm = _shape()
    sm.normalise()
    g = build_geometry(wcs, shape, ra, dec, 2.5)
    pairs = _FramePairs(sm, g, kind, 2.0)
    a = np.random.default_rng(3).normal(0, 0.2, len(TRANSFORM_TERMS[kind]))
    vals, (core, d_sx, d_sy) = pairs.values(sm, a, core_radius=1.0)
    assert core.size > 0
    h = 1e-5
    src = pairs.geom.src[core]
    for k in range(a.size):
        da = np.zeros_like(a)
        da[k] = h
        fd = (pairs.values(sm, a + da)[0] - pairs.values(sm, a - da)[0])[core] / (2 * h)
        analytic = d_sx * pairs.bx[src, k] + d_sy * pairs.by[src, k]
        np.testing.assert_allclose(analytic, fd, rtol=1e-4, atol=1e-7 * np.abs(vals).max())


def test_centroid_of_a_shape_is_where_its_light_is():
    sm = _shape()
    sm.normalise()
    # A round shape (phi-free weights) is centred; its centroid is 0 to quadrature precision.
    table = sm.weight_table()
    round_w = np.concatenate([table[: sm.n_cut, 0], np.repeat(table[sm.n_cut :, 0], sm.n_phi_knots)])
    rs = ShapeModel(10, 15, 0.1, 2.0, 0.2, weights=round_w)
    assert np.abs(shape_centroid(rs, 0.5)).max() < 1e-12
    cxi, ceta = shape_centroid(sm, 0.5)
    # The reference: a dense polar sum of the density.
    r = (np.arange(2000) + 0.5) * 0.5 / 2000
    phi = (np.arange(720) + 0.5) * 2 * np.pi / 720
    rr, pp = np.meshgrid(r, phi, indexing="ij")
    w = sm.density(rr, pp) * rr
    assert cxi == pytest.approx(float(np.sum(w * rr * np.cos(pp)) / w.sum()), abs=1e-6)
    assert ceta == pytest.approx(float(np.sum(w * rr * np.sin(pp)) / w.sum()), abs=1e-6)


def test_simulated_drift_follows_its_recipe(tmp_path):
    sim = simulate_field(
        tmp_path, "kepler", seed=0, n_frames=5, n_stars=10, size=40, drift=0.5, scale_drift=0.01
    )
    truth = Table.read(sim["truth"])
    dx = np.asarray(truth["dx"]).reshape(5, 10)
    dy = np.asarray(truth["dy"]).reshape(5, 10)
    x = np.asarray(truth["x"][:10])
    y = np.asarray(truth["y"][:10])
    tau = np.arange(5) / 4
    ang = np.deg2rad(truth.meta["DRIFTANG"])
    np.testing.assert_allclose(
        dx, 0.5 * tau[:, None] ** 2 * np.cos(ang) + 0.01 * tau[:, None] * (x - 19.5), atol=1e-6
    )
    np.testing.assert_allclose(
        dy, 0.5 * tau[:, None] ** 2 * np.sin(ang) + 0.01 * tau[:, None] * (y - 19.5), atol=1e-6
    )
    assert np.all(dx[0] == 0) and np.all(dy[0] == 0)


def _drift_case(tmp_path, name, drift, scale_drift, kind="affine"):
    sizes = {"kepler": dict(n_stars=100, size=96), "roman": dict(n_stars=120, size=128)}[name]
    sim = simulate_field(tmp_path, name, seed=1, n_frames=20, drift=drift, scale_drift=scale_drift, **sizes)
    flux, err, mask, wcs = load_frames(sim["paths"])
    truth = Table.read(sim["truth"])
    cat = Table.read(sim["catalog"])
    ns = len(cat)
    pair, edge = np.asarray(truth["pair_id"][:ns]), np.asarray(truth["edge"][:ns])
    params = PRFParameters(**sim["prf_params"], time_model=True, transform=kind, time_build_frames=6)
    model = PRFModel.build(flux, err, wcs, cat["ra"], cat["dec"], cat["flux"], params=params, mask=mask)
    oracle, _ = oracle_fit(sim, flux, err, mask)
    return dict(
        sim=sim,
        frames=(flux, err, mask, wcs),
        truth=truth,
        model=model,
        pair=pair,
        edge=edge,
        iso=(pair < 0) & ~edge,
        oracle=oracle,
        true=true_fluxes(sim, sim["prf_params"]["rmax"]),
        true_total=true_fluxes(sim),
        ns=ns,
    )


@pytest.mark.parametrize("name", ["roman", "kepler"])
def test_time_model_reaches_the_oracle_under_drift(tmp_path, name):
    case = _drift_case(tmp_path, name, drift=0.5, scale_drift=0.25 / (96 if name == "kepler" else 128) * 2)
    flux, err, mask, wcs = case["frames"]
    model = case["model"]
    static = model.fit(flux, err, mask, wcs, time_model=False, return_model=True)
    moving = model.fit(flux, err, mask, wcs, return_model=True)
    # The model images: data - model is noise on the source pixels with the time model, not without.
    source_pixels = ~mask & (moving.model > err)
    chi2 = [float(np.mean(((flux - r.model) / err)[source_pixels] ** 2)) for r in (moving, static)]
    assert 0.9 <= chi2[0] <= 1.2 and chi2[1] > 2.0
    oracle = time_scatter(case["oracle"], case["true_total"], case["pair"], case["edge"])
    ratio_static = time_scatter(static.flux, case["true"], case["pair"], case["edge"]) / oracle
    ratio = time_scatter(moving.flux, case["true"], case["pair"], case["edge"]) / oracle
    score = score_fluxes(moving.flux, moving.flux_err, case["true"], case["pair"], case["edge"])
    assert ratio_static > 2.0  # the drift does hurt a static model (measured 3.2x Roman, 4.3x Kepler)
    assert ratio <= 1.10
    assert 0.8 <= score["isolated_chi_std"] <= 1.25
    assert score["blends_chi_std"] <= 1.5
    # The transforms, up to a constant (where the model's centre is: its centroid within 1.5 px).
    g = model.frames.geometry(wcs[0])
    shifts = np.array([source_shifts(model.params.transform, g, a) for a in moving.transform])
    err = transform_error(case["sim"], shifts)
    assert np.sqrt(np.mean(np.sum(err**2, axis=1))) < 2e-3
    assert max(abs(c) for c in model.time_model.diagnostics["recentre_px"][-1]) < 0.03  # rounds converge


def test_time_model_changes_nothing_without_drift(tmp_path):
    case = _drift_case(tmp_path, "kepler", drift=0.0, scale_drift=0.0)
    flux, err, mask, wcs = case["frames"]
    model = case["model"]
    static = model.fit(flux, err, mask, wcs, time_model=False)
    moving = model.fit(flux, err, mask, wcs)
    s_static = time_scatter(static.flux, case["true"], case["pair"], case["edge"])
    s_moving = time_scatter(moving.flux, case["true"], case["pair"], case["edge"])
    assert s_moving <= 1.02 * s_static
    assert np.abs(moving.transform[:, 2:]).max() < 2e-3  # no plate-scale change where there is none


def test_time_model_survives_serialisation(tmp_path):
    sim = simulate_field(tmp_path, "kepler", seed=2, n_frames=4, n_stars=30, size=48, drift=0.3)
    flux, err, mask, wcs = load_frames(sim["paths"])
    cat = Table.read(sim["catalog"])
    params = PRFParameters(
        **sim["prf_params"],
        time_model=True,
        transform="scale",
        time_rounds=1,
        time_build_frames=2,
        refine_iterations=3,
    )
    model = PRFModel.build(flux, err, wcs, cat["ra"], cat["dec"], cat["flux"], params=params, mask=mask)
    back = PRFModel.load(model.save(tmp_path / "m.npz"))
    assert back.time_model.kind == "scale"
    np.testing.assert_array_equal(back.time_model.shape.weights, model.time_model.shape.weights)
    np.testing.assert_array_equal(back.time_model.transforms, model.time_model.transforms)
    a = model.fit(flux, err, mask, wcs)
    b = back.fit(flux, err, mask, wcs)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.transform, b.transform)
    assert a.transform_terms == ("dx", "dy", "scale")
    with pytest.raises(ValueError, match="no time model"):
        PRFModel.build(
            flux,
            err,
            wcs,
            cat["ra"],
            cat["dec"],
            cat["flux"],
            params=PRFParameters(**sim["prf_params"], refine_iterations=2),
            mask=mask,
        ).fit(flux, err, mask, wcs, time_model=True)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(transform="rotate"), "transform"),
        (dict(time_rounds=-1), "time_rounds"),
        (dict(time_build_frames=0), "time_build_frames"),
        (dict(time_iterations=0), "time_iterations"),
        (dict(time_core_radius=5.0), "time_core_radius"),
        (dict(time_max_shift=0.0), "time_max_shift"),
        (dict(time_model="yes"), "time_model"),
    ],
)
def test_time_model_parameters_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        PRFParameters(**bad)
