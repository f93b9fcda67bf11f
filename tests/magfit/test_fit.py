"""The per-frame magnitude fit against a slow, obviously-correct reference, and its conditioning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from photref_core.magfit.fit import fit_photometry, fit_weights, frame_design, normalised_error
from photref_core.magfit.parameters import MagfitParameters
from photref_core.master.fitterms import parse_fit_terms


def reference_fit(X, target, mag_err, eligible, params):
    """One frame, one photometry: plain weighted least squares (numpy lstsq), the same rejection, written
    out the slow way."""
    n_terms = X.shape[1]
    rows = [
        s
        for s in range(X.shape[0])
        if eligible[s]
        and np.all(np.isfinite(X[s]))
        and np.isfinite(target[s])
        and np.isfinite(mag_err[s])
        and 0 < mag_err[s] <= params.max_mag_err
    ]
    min_stars = int(np.ceil(params.min_stars_per_term * n_terms))
    coef = None
    for refit in range(params.magfit_max_rejection_iterations + 1):
        if len(rows) < min_stars:
            return None, rows
        sw = np.sqrt([fit_weights(mag_err[s], params) for s in rows])
        coef = np.linalg.lstsq(X[rows] * sw[:, None], target[rows] * sw, rcond=None)[0]
        z = [(target[s] - X[s] @ coef) / normalised_error(mag_err[s], params) for s in rows]
        mean_z2 = sum(v * v for v in z) / len(rows)
        if refit == params.magfit_max_rejection_iterations:
            break
        kept = [
            s for s, v in zip(rows, z, strict=True) if v * v <= params.magfit_rejection_level**2 * mean_z2
        ]
        if len(kept) == len(rows):
            break
        rows = kept
    return coef, rows


def simulated_batch(seed, n_frames=5, n_stars=400, outliers=0.02):
    rng = np.random.default_rng(seed)
    g = rng.uniform(8, 16, n_stars)
    x = rng.uniform(0, 2048, (n_frames, n_stars))
    y = rng.uniform(0, 2048, (n_frames, n_stars))
    err = 0.003 + 0.01 * 10 ** (0.4 * (g - 14)) * rng.uniform(0.9, 1.1, (n_frames, n_stars))
    zero_point = rng.uniform(-0.5, 0.5, (n_frames, 1))
    pattern = 0.05 * ((x - 1024) / 1024) ** 2 - 0.03 * (y / 2048) * (g - 12) / 4
    target = zero_point + pattern + rng.normal(0, 1, (n_frames, n_stars)) * err
    bad = rng.random((n_frames, n_stars)) < outliers
    target[bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(0.05, 1.0, bad.sum())
    target[rng.random((n_frames, n_stars)) < 0.01] = np.nan
    measured = np.isfinite(target)
    return dict(g=g, x=x, y=y, err=err, target=target, measured=measured)


@pytest.mark.parametrize("weighting", ["inverse_variance", "autowisp", "none"])
def test_batched_fit_matches_the_slow_reference(weighting):
    params = MagfitParameters(magfit_weighting=weighting, min_stars_per_term=5)
    data = simulated_batch(1)
    terms = parse_fit_terms("O3{phot_g_mean_mag, x, y}")
    design = frame_design(
        terms, {"phot_g_mean_mag": data["g"], "x": data["x"], "y": data["y"]}, data["measured"]
    )
    eligible = np.ones(data["g"].size, bool)
    eligible[::37] = False  # e.g. not in the catalog
    fit = fit_photometry(design, data["target"], data["err"], eligible, params)
    for b in range(design.shape[0]):
        coef, rows = reference_fit(design[b], data["target"][b], data["err"][b], eligible, params)
        assert fit.problem[b] is None
        assert sorted(np.flatnonzero(fit.used[b])) == rows
        expected = design[b] @ coef
        np.testing.assert_allclose(fit.correction[b], expected, rtol=0, atol=1e-9)
        assert fit.n_used[b] == len(rows) < fit.n_candidates[b]  # the outliers left the fit
    # The injected outliers are the stars rejected (nearly all; a few small ones stay within 5 sigma).
    assert fit.n_fits.max() > 1


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    level=st.floats(2.0, 6.0),
    max_refits=st.integers(0, 4),
    max_err=st.floats(0.01, 0.2),
)
def test_batched_fit_matches_the_reference_for_any_rejection_setting(seed, level, max_refits, max_err):
    params = MagfitParameters(
        magfit_rejection_level=level,
        magfit_max_rejection_iterations=max_refits,
        max_mag_err=max_err,
        min_stars_per_term=3,
    )
    data = simulated_batch(seed, n_frames=3, n_stars=150, outliers=0.05)
    terms = parse_fit_terms("O1{phot_g_mean_mag}*O1{x}+O2{y}")
    design = frame_design(
        terms, {"phot_g_mean_mag": data["g"], "x": data["x"], "y": data["y"]}, data["measured"]
    )
    eligible = np.ones(data["g"].size, bool)
    fit = fit_photometry(design, data["target"], data["err"], eligible, params)
    for b in range(design.shape[0]):
        coef, rows = reference_fit(design[b], data["target"][b], data["err"][b], eligible, params)
        if coef is None:
            assert fit.problem[b] is not None and "usable stars" in fit.problem[b]
            assert np.isnan(fit.correction[b]).all()
            continue
        assert fit.problem[b] is None
        assert sorted(np.flatnonzero(fit.used[b])) == rows
        np.testing.assert_allclose(fit.correction[b], design[b] @ coef, rtol=0, atol=1e-9)


def test_rescaling_leaves_the_model_unchanged_and_the_design_well_conditioned():
    data = simulated_batch(3, n_frames=1, n_stars=600, outliers=0.0)
    terms = parse_fit_terms("O3{phot_g_mean_mag, x, y}")
    columns = {"phot_g_mean_mag": data["g"], "x": data["x"], "y": data["y"]}
    scaled = frame_design(terms, columns, data["measured"])[0]
    raw = terms.evaluate({k: np.broadcast_to(v, (1, 600))[0] for k, v in columns.items()})
    finite = np.isfinite(data["target"][0])
    assert np.linalg.cond(raw[finite]) > 1e10  # what a design of raw magnitudes and pixels is
    assert np.linalg.cond(scaled[finite]) < 1e3
    # Same column span: the raw design's least-squares fit (SVD, good to ~cond x eps relative to the
    # data) gives the scaled design's fitted values.
    y = data["target"][0][finite]
    fit_scaled = scaled[finite] @ np.linalg.lstsq(scaled[finite], y, rcond=None)[0]
    fit_raw = raw[finite] @ np.linalg.lstsq(raw[finite], y, rcond=None)[0]
    np.testing.assert_allclose(fit_scaled, fit_raw, atol=1e-5)


def test_terms_in_literal_sets_are_not_rescaled():
    terms = parse_fit_terms("O2{x}*{1, y}+{log10(z)}")
    assert terms.inner_terms == ["x", "1", "y", "log10(z)"]
    assert list(terms.rescalable) == [True, False, False, False]
    values = np.array([[2.0, 1.0, 3.0, 0.5]])
    np.testing.assert_allclose(terms.expand(values), terms.evaluate({"x": [2.0], "y": [3.0], "z": [10**0.5]}))


def test_too_few_stars_and_singular_terms_fail_the_frame_with_a_reason():
    params = MagfitParameters(min_stars_per_term=10)
    data = simulated_batch(5, n_frames=3, n_stars=200, outliers=0.0)
    terms = parse_fit_terms("O1{x, y}")
    x = data["x"].copy()
    x[1] = 100.0  # every star of frame 1 at one x: singular
    design = frame_design(terms, {"x": x, "y": data["y"]}, data["measured"])
    eligible = np.ones(200, bool)
    err = data["err"].copy()
    err[2, 20:] = 0.5  # frame 2: 20 stars under max_mag_err, 30 needed
    fit = fit_photometry(design, data["target"], err, eligible, params)
    assert fit.problem[0] is None
    assert "singular" in fit.problem[1]
    assert "usable stars" in fit.problem[2] and "needs 30" in fit.problem[2]
    assert np.isnan(fit.correction[1:]).all() and np.isfinite(fit.correction[0][data["measured"][0]]).all()
