"""Tests of photref_core.master.scatter.fit_scatter (SPEC 5) against a slow, obviously correct reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from photref_core.errors import FitError
from photref_core.master.scatter import ScatterFitParameters, ScatterFitResult, fit_scatter


def reference_fit(scatter, X, enough, threshold=3.0, average="median", max_rej_iter=20):
    """SPEC 5 written out star by star; normal equations solved with plain numpy at every fit."""
    nstars, nterms = X.shape
    y = [math.log10(s) if s > 0 and math.isfinite(s) else math.nan for s in scatter]
    usable = [
        bool(enough[i]) and math.isfinite(y[i]) and all(math.isfinite(v) for v in X[i]) for i in range(nstars)
    ]
    in_fit = list(usable)
    n_fits = 0
    while True:
        members = [i for i in range(nstars) if in_fit[i]]
        if len(members) < nterms:
            raise FitError("too few")
        A = np.array([X[i] for i in members])
        b = np.array([y[i] for i in members])
        coef = np.linalg.solve(A.T @ A, A.T @ b)
        n_fits += 1
        r2 = {i: (sum(X[i][j] * coef[j] for j in range(nterms)) - y[i]) ** 2 for i in members}
        values = sorted(r2.values())
        m = len(values)
        if average == "median":
            res2 = (values[(m - 1) // 2] + values[m // 2]) / 2
        else:
            res2 = sum(values) / m
        leaving = [i for i in members if r2[i] > threshold**2 * res2]
        if not leaving or n_fits == 1 + max_rej_iter:
            break
        for i in leaving:
            in_fit[i] = False
    excess = [
        y[i] - sum(X[i][j] * coef[j] for j in range(nterms))
        if math.isfinite(y[i]) and all(math.isfinite(v) for v in X[i])
        else math.nan
        for i in range(nstars)
    ]
    finite = sorted(abs(e) for e in excess if math.isfinite(e))
    m = len(finite)
    avg = (finite[(m - 1) // 2] + finite[m // 2]) / 2 if average == "median" else sum(finite) / m
    in_master = [
        bool(enough[i]) and math.isfinite(excess[i]) and excess[i] <= threshold * avg for i in range(nstars)
    ]
    rms = math.sqrt(sum(r2.values()) / len(r2))
    return {
        "coefficients": coef,
        "scatter_excess": np.array(excess),
        "in_fit": np.array(in_fit),
        "usable": np.array(usable),
        "n_fits": n_fits,
        "in_master": np.array(in_master),
        "rms": rms,
    }


def simulated_field(seed, nstars=400, outlier_fraction=0.08):
    """Scatter rising towards faint magnitudes, lognormal noise, some very noisy stars (variables)."""
    rng = np.random.default_rng(seed)
    mag = rng.uniform(9.0, 17.0, nstars)
    t = (mag - 13.0) / 4.0  # well-conditioned predictor
    log_scatter = -2.3 + 0.6 * t + 0.35 * t**2 + rng.normal(0.0, 0.05, nstars)
    noisy = rng.random(nstars) < outlier_fraction
    log_scatter[noisy] += rng.uniform(0.3, 1.5, noisy.sum())
    X = np.column_stack([np.ones(nstars), t, t**2])
    enough = rng.random(nstars) > 0.1
    return 10.0**log_scatter, X, enough


def assert_matches_reference(result, ref):
    np.testing.assert_allclose(result.coefficients, ref["coefficients"], rtol=1e-10, atol=0)
    np.testing.assert_array_equal(np.isnan(result.scatter_excess), np.isnan(ref["scatter_excess"]))
    finite = np.isfinite(ref["scatter_excess"])
    np.testing.assert_allclose(
        result.scatter_excess[finite], ref["scatter_excess"][finite], rtol=1e-10, atol=1e-13
    )
    np.testing.assert_array_equal(result.in_fit, ref["in_fit"])
    np.testing.assert_array_equal(result.usable, ref["usable"])
    np.testing.assert_array_equal(result.in_master, ref["in_master"])
    assert result.n_fits == ref["n_fits"]
    assert result.rms == pytest.approx(ref["rms"], rel=1e-10)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("average", ["median", "mean"])
def test_matches_reference_on_simulated_field(seed, average):
    scatter, X, enough = simulated_field(seed)
    params = ScatterFitParameters(fit_outlier_average=average)
    result = fit_scatter(scatter, X, enough, params)
    ref = reference_fit(scatter, X, enough, average=average)
    assert_matches_reference(result, ref)
    assert isinstance(result, ScatterFitResult)
    assert result.n_fits > 1  # the outliers made it iterate
    assert result.in_fit.sum() < result.usable.sum()
    assert not (result.in_fit & ~result.usable).any()
    # The model is recovered despite the outliers.
    np.testing.assert_allclose(result.coefficients, [-2.3, 0.6, 0.35], atol=0.05)


def test_matches_reference_with_gaps_and_other_threshold():
    scatter, X, enough = simulated_field(7, nstars=300)
    scatter[[0, 5]] = 0.0  # saturated / single measurement
    scatter[[1]] = np.nan
    X[[2, 3], 1] = np.nan  # not in the catalog
    X[4, 2] = np.inf
    params = ScatterFitParameters(fit_outlier_threshold=2.0, fit_max_rej_iter=5)
    result = fit_scatter(scatter, X, enough, params, photometry=3)
    ref = reference_fit(scatter, X, enough, threshold=2.0, max_rej_iter=5)
    assert_matches_reference(result, ref)
    assert not result.usable[:5].any()
    assert np.isnan(result.scatter_excess[:5]).all()
    assert not result.in_master[:5].any()


def test_zero_scatter_star_excluded_everywhere():
    scatter, X, enough = simulated_field(11, nstars=100)
    enough[:] = True
    scatter[17] = 0.0
    result = fit_scatter(scatter, X, enough, ScatterFitParameters())
    assert not result.usable[17] and not result.in_fit[17]
    assert np.isnan(result.scatter_excess[17])
    assert not result.in_master[17]
    assert result.usable.sum() == 99


def test_excess_computed_for_stars_without_enough_counts():
    scatter, X, enough = simulated_field(12, nstars=120)
    result = fit_scatter(scatter, X, enough, ScatterFitParameters())
    not_enough = ~enough
    assert not_enough.any()
    assert np.isfinite(result.scatter_excess[not_enough]).all()
    assert not result.in_fit[not_enough].any() and not result.in_master[not_enough].any()
    np.testing.assert_allclose(
        result.scatter_excess, np.log10(scatter) - X @ result.coefficients, rtol=1e-12, atol=1e-14
    )


def test_too_few_stars_error_names_photometry_and_counts():
    scatter, X, enough = simulated_field(5, nstars=10)
    enough[:] = False
    enough[:2] = True
    with pytest.raises(FitError) as info:
        fit_scatter(scatter, X, enough, ScatterFitParameters(), photometry=4)
    message = str(info.value)
    assert "photometry 4" in message and "2 stars" in message and "3 terms" in message


def test_too_few_stars_checked_before_every_fit():
    # Constant model; with a tight threshold every star leaves after the first fit, so the second fit
    # has 0 stars for 1 term. The first fit (7 stars) was possible.
    y = np.array([0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 10.0])
    params = ScatterFitParameters(fit_outlier_threshold=0.5)
    with pytest.raises(FitError) as info:
        fit_scatter(10.0**y, np.ones((7, 1)), np.ones(7, bool), params, photometry=2)
    message = str(info.value)
    assert "photometry 2" in message and "0 stars left to fit 1 terms" in message and "fit 2" in message
    with pytest.raises(FitError):
        reference_fit(10.0**y, np.ones((7, 1)), np.ones(7, bool), threshold=0.5)


def test_zero_terms_refused():
    with pytest.raises(FitError, match="no fit terms"):
        fit_scatter(np.ones(3), np.zeros((3, 0)), np.ones(3, bool), ScatterFitParameters())


def geometric_outliers(n_quiet, n_outliers, ratio):
    """Quiet stars plus outliers at ratio, ratio**2, ... dex: with the mean average few leave per fit."""
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(0.0, 0.01, n_quiet), ratio ** np.arange(1, n_outliers + 1)])
    assert y.max() < 300  # 10**y stays finite
    return 10.0**y, np.ones((y.size, 1)), np.ones(y.size, bool)


def test_iteration_limit_honoured():
    scatter, X, enough = geometric_outliers(n_quiet=30, n_outliers=8, ratio=2.0)
    unlimited = fit_scatter(scatter, X, enough, ScatterFitParameters(fit_outlier_average="mean"))
    assert_matches_reference(unlimited, reference_fit(scatter, X, enough, average="mean"))
    assert unlimited.n_fits == 9  # exactly one outlier leaves per fit
    assert unlimited.in_fit.sum() == 30
    for limit in (0, 1, 3, 5, 7):
        params = ScatterFitParameters(fit_outlier_average="mean", fit_max_rej_iter=limit)
        limited = fit_scatter(scatter, X, enough, params)
        assert limited.n_fits == 1 + limit
        assert_matches_reference(
            limited, reference_fit(scatter, X, enough, average="mean", max_rej_iter=limit)
        )
        # The stars of the last fit are in_fit, even though that fit would have rejected another one.
        assert limited.in_fit.sum() == X.shape[0] - limit
        np.testing.assert_allclose(
            limited.coefficients, [np.log10(scatter[limited.in_fit]).mean()], rtol=1e-12
        )


def test_default_iteration_limit_is_21_fits():
    scatter, X, enough = geometric_outliers(n_quiet=20, n_outliers=25, ratio=1.25)
    generous = ScatterFitParameters(fit_outlier_average="mean", fit_max_rej_iter=100)
    assert fit_scatter(scatter, X, enough, generous).n_fits > 21  # would need more than the default
    default = fit_scatter(scatter, X, enough, ScatterFitParameters(fit_outlier_average="mean"))
    assert default.n_fits == 21
    assert_matches_reference(default, reference_fit(scatter, X, enough, average="mean"))


def test_no_rejection_needed_single_fit():
    rng = np.random.default_rng(9)
    t = rng.uniform(-1, 1, 50)
    X = np.column_stack([np.ones(50), t])
    y = 0.5 + 0.25 * t  # exact: all residuals ~ 0
    y += rng.uniform(-1e-3, 1e-3, 50)
    result = fit_scatter(10.0**y, X, np.ones(50, bool), ScatterFitParameters(fit_outlier_threshold=10.0))
    assert result.n_fits == 1 and result.in_fit.all()
    np.testing.assert_allclose(result.coefficients, [0.5, 0.25], atol=1e-3)


def test_in_master_is_one_sided_and_averages_over_all_finite_excess():
    rng = np.random.default_rng(21)
    n = 200
    t = rng.uniform(-1, 1, n)
    X = np.column_stack([np.ones(n), t])
    y = -2.0 + 0.5 * t + rng.normal(0, 0.02, n)
    y[0] -= 3.0  # unusually QUIET star: far below the fit, stays in the master
    y[1] += 3.0  # unusually NOISY star: dropped
    enough = np.ones(n, bool)
    enough[2] = False  # not enough counts: never in the master, but its excess counts in the average
    result = fit_scatter(10.0**y, X, enough, ScatterFitParameters())
    assert not result.in_fit[0] and not result.in_fit[1]  # both left the fit
    assert result.scatter_excess[0] < -2.5 and result.in_master[0]
    assert result.scatter_excess[1] > 2.5 and not result.in_master[1]
    assert not result.in_master[2] and np.isfinite(result.scatter_excess[2])
    limit = 3.0 * np.median(np.abs(result.scatter_excess))
    np.testing.assert_array_equal(result.in_master, enough & (result.scatter_excess <= limit))


def test_in_master_average_includes_rejected_and_not_enough_stars():
    # Build a case where the average over ALL finite excess differs from the average over the fit stars.
    rng = np.random.default_rng(5)
    n = 60
    X = np.ones((n, 1))
    y = rng.normal(0, 0.1, n)
    y[:25] += rng.uniform(0.5, 0.9, 25)  # a large noisy group, most without enough counts
    enough = np.ones(n, bool)
    enough[:20] = False
    for average in ("median", "mean"):
        params = ScatterFitParameters(fit_outlier_threshold=1.5, fit_outlier_average=average)
        result = fit_scatter(10.0**y, X, enough, params)
        avg = np.median if average == "median" else np.mean
        everyone = 1.5 * avg(np.abs(result.scatter_excess))
        np.testing.assert_array_equal(result.in_master, enough & (result.scatter_excess <= everyone))
        assert_matches_reference(result, reference_fit(10.0**y, X, enough, threshold=1.5, average=average))


def test_mean_and_median_give_different_fits():
    scatter, X, enough = simulated_field(4)
    median = fit_scatter(scatter, X, enough, ScatterFitParameters(fit_outlier_average="median"))
    mean = fit_scatter(scatter, X, enough, ScatterFitParameters(fit_outlier_average="mean"))
    assert not np.array_equal(median.in_fit, mean.in_fit)
    # The median of r^2 is smaller than the mean: the median rule rejects more.
    assert median.in_fit.sum() < mean.in_fit.sum()


def test_parameters_defaults_and_validation():
    params = ScatterFitParameters()
    assert (params.fit_outlier_threshold, params.fit_outlier_average, params.fit_max_rej_iter) == (
        3.0,
        "median",
        20,
    )
    assert params.scatter_quantity == "medianmeddev"
    ScatterFitParameters(
        scatter_quantity="mediandev", fit_outlier_threshold=np.float64(2.5), fit_max_rej_iter=0
    )
    for bad in (
        {"fit_outlier_average": "mode"},
        {"fit_outlier_average": "nanmedian"},
        {"scatter_quantity": "stddev"},
        {"fit_outlier_threshold": 0.0},
        {"fit_outlier_threshold": -1.0},
        {"fit_outlier_threshold": math.inf},
        {"fit_outlier_threshold": "3"},
        {"fit_max_rej_iter": -1},
        {"fit_max_rej_iter": 2.5},
    ):
        with pytest.raises(ValueError):
            ScatterFitParameters(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.fit_max_rej_iter = 3


def test_shape_validation():
    with pytest.raises(ValueError, match="X must have shape"):
        fit_scatter(np.ones(3), np.ones((4, 1)), np.ones(3, bool), ScatterFitParameters())
    with pytest.raises(ValueError, match="enough must have shape"):
        fit_scatter(np.ones(3), np.ones((3, 1)), np.ones(4, bool), ScatterFitParameters())
    with pytest.raises(ValueError, match="one-dimensional"):
        fit_scatter(np.ones((3, 1)), np.ones((3, 1)), np.ones(3, bool), ScatterFitParameters())


def test_with_fit_terms_on_raw_magnitudes():
    """End to end with the default expression on raw G magnitudes (a less well-conditioned X)."""
    from photref_core.master.fitterms import DEFAULT_FIT_TERMS, parse_fit_terms

    rng = np.random.default_rng(42)
    n = 500
    g = rng.uniform(8.0, 18.0, n)
    log_scatter = -2.5 + 0.02 * (g - 8.0) ** 2 + rng.normal(0, 0.04, n)
    log_scatter[rng.random(n) < 0.05] += 1.0
    X = parse_fit_terms(DEFAULT_FIT_TERMS).evaluate({"phot_g_mean_mag": g})
    enough = np.ones(n, bool)
    result = fit_scatter(10.0**log_scatter, X, enough, ScatterFitParameters())
    ref = reference_fit(10.0**log_scatter, X, enough)
    np.testing.assert_allclose(result.coefficients, ref["coefficients"], rtol=1e-8)
    np.testing.assert_array_equal(result.in_fit, ref["in_fit"])
    np.testing.assert_array_equal(result.in_master, ref["in_master"])
    np.testing.assert_allclose(result.coefficients, [-2.5 + 1.28, -0.32, 0.02], atol=0.05)
