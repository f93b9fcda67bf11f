"""Tests of photref_core.stats: statistics with iterative rejection (SPEC section 3).

The reference implementation below is deliberately slow and literal: plain Python per star, sorted lists,
straight from the SPEC text. The vectorised implementation must agree with it to 1e-12 relative (counts
exactly) on realistic simulated data, for every rejection centre and unit.
"""

from __future__ import annotations

import itertools
import math

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from photref_core.master import outofcore
from photref_core.master.outofcore import source_statistics_dask
from photref_core.master.stats import (
    STATISTIC_NAMES,
    RejectionParameters,
    enough_flags,
    kept_ranges,
    rejected_statistics,
    source_statistics,
)

CENTERS = ("median", "mean")
UNITS = ("stddev", "meddev", "absolute")
DIMS = ("frame", "source", "photometry")
KEYS = ("full_count", "rejected_count", "center", "mediandev", "medianmeddev")
NAN = float("nan")


# ------------------------------------------------------------------------------------------------------
# Reference implementation (SPEC 3, literally)
# ------------------------------------------------------------------------------------------------------


def ref_median(values: list[float]) -> float:
    """Median of m sorted values a: (a[(m-1)//2] + a[m//2]) / 2."""
    a = sorted(values)
    m = len(a)
    return (a[(m - 1) // 2] + a[m // 2]) / 2


def ref_mean(values: list[float]) -> float:
    """The mean, as close to correctly rounded as plain Python gets (exact sums, one correction)."""
    m = len(values)
    first = math.fsum(values) / m
    return first + math.fsum(x - first for x in values) / m


def ref_center(values, params) -> float:
    return ref_median(values) if params.rejection_center == "median" else ref_mean(values)


def ref_unit(values, c, params) -> float:
    if params.rejection_units == "stddev":
        return math.sqrt(math.fsum((x - c) * (x - c) for x in values) / len(values))
    if params.rejection_units == "meddev":
        return ref_median([abs(x - c) for x in values])
    return 1.0


def ref_kept(values, params) -> tuple[int, list[float]]:
    """(n, final K) for the measurements ``values`` (non-finite ones are missing)."""
    X = sorted(float(x) for x in values if math.isfinite(x))
    K = list(X)
    for _ in range(params.max_rejection_iterations):
        if not K:
            break
        c = ref_center(K, params)
        u = ref_unit(K, c, params)
        if u == 0:
            break
        new_K = [x for x in X if abs(x - c) <= params.outlier_threshold * u]
        if new_K == K:
            break
        K = new_K
    return len(X), K


def ref_statistics(values, params) -> tuple:
    """(full_count, rejected_count, center, mediandev, medianmeddev) of one star."""
    n, K = ref_kept(values, params)
    if not K:
        return n, 0, NAN, NAN, NAN
    c = ref_center(K, params)
    mediandev = math.sqrt(math.fsum((x - c) * (x - c) for x in K) / len(K))
    medianmeddev = ref_median([abs(x - c) for x in K])
    return n, len(K), c, mediandev, medianmeddev


def ref_columns(values: np.ndarray, params) -> dict[str, np.ndarray]:
    """Reference statistics of every column of a (frame, source) array."""
    rows = [ref_statistics(list(values[:, j]), params) for j in range(values.shape[1])]
    return {
        key: np.array([row[i] for row in rows], dtype=np.int64 if i < 2 else np.float64)
        for i, key in enumerate(KEYS)
    }


def ref_source_statistics(mag: np.ndarray, mag_err: np.ndarray, params) -> dict[str, np.ndarray]:
    """Reference of source_statistics: SPEC 1.1 missing measurements, then per star and photometry."""
    nframes, nsources, nphot = mag.shape
    out = {name: np.zeros((nsources, nphot)) for name in STATISTIC_NAMES}
    for s, p in itertools.product(range(nsources), range(nphot)):
        good = [
            f
            for f in range(nframes)
            if math.isfinite(mag[f, s, p]) and math.isfinite(mag_err[f, s, p]) and mag_err[f, s, p] > 0
        ]
        for prefix, array in (("", mag), ("mag_err_", mag_err)):
            values = ref_statistics([float(array[f, s, p]) for f in good], params)
            for key, value in zip(KEYS, values, strict=True):
                out[_name(prefix, key)][s, p] = value
    for name in out:
        if name.endswith("count"):
            out[name] = out[name].astype(np.int64)
    return out


def _name(prefix: str, key: str) -> str:
    if key == "center":
        return "magnitude" if prefix == "" else "mag_err"
    return prefix + key


def assert_same_statistics(got, expected, names=None, context=""):
    """Counts exactly, everything else to 1e-12 relative (NaN where NaN)."""
    for name in names or expected:
        g = np.asarray(got[name])
        e = np.asarray(expected[name])
        if name.endswith("count"):
            assert g.dtype == np.int64, name
            np.testing.assert_array_equal(g, e, err_msg=f"{context} {name}")
        else:
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=0, equal_nan=True, err_msg=f"{context} {name}")


# ------------------------------------------------------------------------------------------------------
# Simulated photometry
# ------------------------------------------------------------------------------------------------------


def simulate(seed: int, nframes: int, nsources: int, nphot: int) -> tuple[np.ndarray, np.ndarray]:
    """Realistic (frame, source, photometry) mag and mag_err, with the awkward stars first.

    Magnitudes 8-16 with noise growing with magnitude and photometry, 1-2 % outliers, about 3 % missing
    values and a few bad errors. Stars 0-8 (when there are at least 12): never measured, measured once,
    three times, saturated (all values equal), mostly equal, good mags with bad errors only, two values far
    apart, half the mags infinite, half the errors NaN.
    """
    rng = np.random.default_rng(seed)
    mag0 = rng.uniform(8, 16, nsources)
    sigma = 0.004 + 0.05 * 10 ** (0.4 * (mag0 - 16))
    sigma = sigma[None, :, None] * (1 + 0.3 * np.arange(nphot))[None, None, :]
    shape = (nframes, nsources, nphot)
    mag = mag0[None, :, None] + sigma * rng.standard_normal(shape)
    mag_err = sigma * (1 + 0.1 * rng.standard_normal(shape))
    outliers = rng.random(shape) < rng.uniform(0.01, 0.02)
    mag[outliers] += rng.choice([-1.0, 1.0], outliers.sum()) * rng.uniform(0.05, 3.0, outliers.sum())
    mag[rng.random(shape) < 0.03] = np.nan
    mag_err[rng.random(shape) < 0.005] = 0.0
    mag_err[rng.random(shape) < 0.003] = -0.01
    if nsources >= 12 and nframes >= 6:
        mag[:, 0] = np.nan
        mag[1:, 1] = np.nan
        mag[3:, 2] = np.nan
        mag[:, 3] = 8.125
        mag_err[:, 3] = 0.001
        mag[:, 4] = 7.9
        mag[::5, 4] += 0.25
        mag_err[:, 5] = 0.0
        mag[:, 6] = np.nan
        mag[0, 6], mag[1, 6] = 10.0, 10.5
        mag_err[0:2, 6] = 0.01
        mag[::2, 7] = np.inf
        mag_err[1::2, 8] = np.nan
    return mag, mag_err


# ------------------------------------------------------------------------------------------------------
# Hand-worked examples from the SPEC text
# ------------------------------------------------------------------------------------------------------


def _column(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)[:, None]


def test_hand_example_default_parameters():
    # K = X: c = 3, meddev = median(0, 1, 1, 2, 97) = 1, window [-2, 8] drops 100;
    # K = {1, 2, 3, 4}: c = 2.5, meddev = median(0.5, 0.5, 1.5, 1.5) = 1, same window content: stop.
    got = rejected_statistics(_column([3, 100, 1, 4, 2]), RejectionParameters())
    assert got["full_count"].tolist() == [5]
    assert got["rejected_count"].tolist() == [4]
    assert got["center"].tolist() == [2.5]
    np.testing.assert_allclose(got["mediandev"], [math.sqrt(1.25)], rtol=1e-15)
    assert got["medianmeddev"].tolist() == [1.0]


@pytest.mark.parametrize(
    ("iterations", "expected"),
    [
        # X = {0, 1, 2, 4, 6, 8, 10}, median centre, absolute unit, T = 3:
        # c = 4 -> K = {1, 2, 4, 6}; c = 3 -> K = {0, 1, 2, 4, 6} (0 comes back);
        # c = 2 -> K = {0, 1, 2, 4}; c = 1.5 -> same K: stop.
        (0, (7, 7, 4.0, math.sqrt(85 / 7), 3.0)),
        (1, (7, 4, 3.0, math.sqrt(15 / 4), 1.5)),
        (2, (7, 5, 2.0, math.sqrt(5.0), 2.0)),
        (3, (7, 4, 1.5, 1.5, 1.0)),
        (10, (7, 4, 1.5, 1.5, 1.0)),
    ],
)
def test_hand_example_point_comes_back(iterations, expected):
    params = RejectionParameters(3.0, iterations, "median", "absolute")
    got = rejected_statistics(_column([10, 0, 8, 1, 6, 2, 4]), params)
    assert ref_statistics([10, 0, 8, 1, 6, 2, 4], params) == pytest.approx(expected, rel=1e-15)
    for key, value in zip(KEYS, expected, strict=True):
        np.testing.assert_allclose(got[key], [value], rtol=1e-15, err_msg=key)


@pytest.mark.parametrize("center", CENTERS)
def test_final_kept_set_can_be_empty(center):
    # c = 10.25, |x - c| = 0.25 > T = 0.1 for both values: K' is empty.
    values = _column([10.0, np.nan, 10.5])
    got = rejected_statistics(values, RejectionParameters(0.1, 10, center, "absolute"))
    assert (got["full_count"][0], got["rejected_count"][0]) == (2, 0)
    assert all(np.isnan(got[key][0]) for key in ("center", "mediandev", "medianmeddev"))
    # Without iterations, K = X.
    got = rejected_statistics(values, RejectionParameters(0.1, 0, center, "absolute"))
    assert (got["rejected_count"][0], got["center"][0], got["mediandev"][0]) == (2, 10.25, 0.25)
    assert got["medianmeddev"][0] == 0.25


@pytest.mark.parametrize(("center", "units"), list(itertools.product(CENTERS, UNITS)))
def test_zero_and_one_measurement(center, units):
    values = np.full((4, 3), np.nan)
    values[2, 1] = 12.34
    values[:, 2] = [np.inf, -np.inf, np.nan, 9.5]  # infinities are missing too
    got = rejected_statistics(values, RejectionParameters(2.0, 5, center, units))
    assert got["full_count"].tolist() == [0, 1, 1]
    assert got["rejected_count"].tolist() == [0, 1, 1]
    np.testing.assert_array_equal(got["center"], [np.nan, 12.34, 9.5])
    np.testing.assert_array_equal(got["mediandev"], [np.nan, 0.0, 0.0])
    np.testing.assert_array_equal(got["medianmeddev"], [np.nan, 0.0, 0.0])


def test_missing_measurement_excluded_from_both_statistics():
    # SPEC 1.1: missing when mag or mag_err is not finite or mag_err <= 0.
    mag = np.array([10.0, 11.0, 12.0, np.nan, 13.0, 14.0, 15.0])[:, None, None]
    err = np.array([0.1, -1.0, 0.3, 0.4, 0.0, np.inf, 0.2])[:, None, None]
    ds = source_statistics(mag, err, RejectionParameters(max_rejection_iterations=0))
    for prefix in ("", "mag_err_"):
        assert int(ds[prefix + "full_count"][0, 0]) == 3
        assert int(ds[prefix + "rejected_count"][0, 0]) == 3
    assert float(ds["magnitude"][0, 0]) == 12.0  # median of 10, 12, 15
    assert float(ds["mag_err"][0, 0]) == 0.2  # median of 0.1, 0.3, 0.2


# ------------------------------------------------------------------------------------------------------
# Agreement with the reference on realistic data
# ------------------------------------------------------------------------------------------------------

_THRESHOLDS = {"stddev": (1.0, 2.5, 5.0), "meddev": (1.5, 3.0, 5.0), "absolute": (0.004, 0.03, 0.5)}


@pytest.fixture(scope="module")
def simulated():
    return simulate(seed=11, nframes=100, nsources=45, nphot=2)


@pytest.mark.parametrize(("center", "units"), list(itertools.product(CENTERS, UNITS)))
def test_matches_reference_on_simulated_data(simulated, center, units):
    mag, mag_err = simulated
    rejected_somewhere = empty_somewhere = False
    for threshold, iterations in itertools.product(_THRESHOLDS[units], (0, 1, 3, 10)):
        params = RejectionParameters(threshold, iterations, center, units)
        got = source_statistics(mag, mag_err, params)
        expected = ref_source_statistics(mag, mag_err, params)
        assert_same_statistics(got, expected, context=str(params))
        kept, full = got["rejected_count"].values, got["full_count"].values
        if iterations == 0:
            np.testing.assert_array_equal(kept, full)
        rejected_somewhere |= bool((kept < full).any())
        empty_somewhere |= bool(((kept == 0) & (full > 0)).any())
    assert rejected_somewhere  # the comparison exercised the rejection
    if units == "absolute":
        assert empty_somewhere  # ... and the empty final K


@pytest.mark.parametrize(("center", "units"), [("median", "meddev"), ("mean", "stddev")])
def test_threads_change_nothing(simulated, center, units):
    mag, mag_err = simulated
    params = RejectionParameters(3.0, 10, center, units)
    one = source_statistics(mag, mag_err, params, threads=1)
    two = source_statistics(mag, mag_err, params, threads=2)
    xr.testing.assert_identical(one, two)  # bit for bit, NaNs in the same places


def test_matches_reference_on_full_length_light_curves():
    mag, mag_err = simulate(seed=5, nframes=1120, nsources=14, nphot=1)
    params = RejectionParameters()
    expected = ref_source_statistics(mag, mag_err, params)
    assert_same_statistics(source_statistics(mag, mag_err, params), expected)


def test_special_stars(simulated):
    mag, mag_err = simulated
    ds = source_statistics(mag, mag_err)
    full = ds["full_count"].values
    assert (full[0] == 0).all() and (full[5] == 0).all()  # never measured / only bad errors
    assert np.isnan(ds["magnitude"].values[[0, 5]]).all()
    assert (full[1] == 1).all() and (ds["mediandev"].values[1] == 0).all()
    assert (ds["magnitude"].values[3] == 8.125).all()  # saturated: every value equal
    assert (ds["mediandev"].values[3] == 0).all() and (ds["medianmeddev"].values[3] == 0).all()
    assert (ds["mag_err"].values[3] == 0.001).all() and (ds["mag_err_mediandev"].values[3] == 0).all()
    np.testing.assert_array_equal(ds["full_count"].values, ds["mag_err_full_count"].values)


# ------------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------------

params_strategy = st.builds(
    RejectionParameters,
    outlier_threshold=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 5.0]),
    max_rejection_iterations=st.integers(0, 12),
    rejection_center=st.sampled_from(CENTERS),
    rejection_units=st.sampled_from(UNITS),
)

# Values on a coarse grid: many ties, and exact arithmetic for a median centre.
grid_values = st.one_of(st.integers(-12, 12).map(lambda i: i / 4), st.just(NAN))
any_values = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    st.integers(-12, 12).map(lambda i: i / 4),
    st.just(NAN),
)


def value_arrays(elements, max_frames=25, max_sources=5):
    shapes = st.tuples(st.integers(0, max_frames), st.integers(1, max_sources))
    return shapes.flatmap(lambda shape: hnp.arrays(np.float64, shape, elements=elements))


@settings(max_examples=80, deadline=None)
@given(
    values=value_arrays(grid_values),
    params=params_strategy.filter(lambda p: p.rejection_center == "median"),
)
def test_property_matches_reference_with_ties(values, params):
    # With a median centre and values on a grid every step is exact: the kept sets must be identical.
    expected = ref_columns(values, params)
    assert_same_statistics(rejected_statistics(values, params), expected, context=str(params))


@settings(max_examples=60, deadline=None)
@given(values=value_arrays(any_values), params=params_strategy, seed=st.integers(0, 2**32 - 1))
def test_property_frame_order_is_irrelevant(values, params, seed):
    permuted = values[np.random.default_rng(seed).permutation(values.shape[0])]
    expected = rejected_statistics(values, params)
    got = rejected_statistics(permuted, params)
    for key in KEYS:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(any_values.filter(math.isfinite), min_size=1, max_size=30),
    center=st.sampled_from(CENTERS),
    units=st.sampled_from(UNITS),
    iterations=st.integers(1, 10),
)
def test_property_values_inside_first_window_are_all_kept(values, center, units, iterations):
    probe = RejectionParameters(1.0, iterations, center, units)
    c0 = ref_center(values, probe)
    u0 = ref_unit(values, c0, probe)
    widest = max(abs(x - c0) for x in values)
    threshold = max(0.5, widest / u0 * (1 + 1e-9)) if u0 > 0 else 1.0
    params = RejectionParameters(threshold, iterations, center, units)
    got = rejected_statistics(_column(values), params)
    assert got["rejected_count"][0] == got["full_count"][0] == len(values)
    scale = max(abs(x) for x in values)
    np.testing.assert_allclose(got["center"], [c0], rtol=1e-12, atol=1e-12 * scale)


@settings(max_examples=60, deadline=None)
@given(
    value=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False),
    count=st.integers(1, 30),
    missing=st.integers(0, 10),
    params=params_strategy,
    seed=st.integers(0, 2**32 - 1),
)
def test_property_single_valued_star_has_zero_deviations(value, count, missing, params, seed):
    column = np.array([value] * count + [np.nan] * missing)
    column = column[np.random.default_rng(seed).permutation(column.size)]
    got = rejected_statistics(column[:, None], params)
    assert got["full_count"][0] == got["rejected_count"][0] == count
    assert got["center"][0] == value
    assert got["mediandev"][0] == 0.0 and got["medianmeddev"][0] == 0.0


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    nframes=st.integers(1, 40),
    nsources=st.integers(1, 6),
    params=params_strategy,
    grid=st.booleans(),
)
def test_property_center_within_kept_values(seed, nframes, nsources, params, grid):
    if grid:  # ties everywhere: only a median centre is computed exactly like the reference
        params = RejectionParameters(
            params.outlier_threshold, params.max_rejection_iterations, "median", params.rejection_units
        )
    rng = np.random.default_rng(seed)
    values = 12 + rng.standard_normal((nframes, nsources)) * rng.uniform(0.001, 1, nsources)
    values[rng.random(values.shape) < 0.05] += rng.uniform(-5, 5)
    values[rng.random(values.shape) < 0.1] = np.nan
    if grid:
        values = np.round(values * 4) / 4
    got = rejected_statistics(values, params)
    for j in range(nsources):
        _, K = ref_kept(values[:, j], params)
        assert got["rejected_count"][j] == len(K)
        if K:
            assert min(K) <= got["center"][j] <= max(K)
            assert 0 <= got["medianmeddev"][j] <= max(abs(x - got["center"][j]) for x in K)
        else:
            assert np.isnan(got["center"][j])


# ------------------------------------------------------------------------------------------------------
# Out of core (dask), identical results
# ------------------------------------------------------------------------------------------------------


def _random_chunks(rng, size):
    edges = np.unique(np.concatenate([[0, size], rng.integers(0, size + 1, rng.integers(0, 4))]))
    return tuple(int(x) for x in np.diff(edges)) or (0,)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    nframes=st.integers(1, 30),
    nsources=st.integers(1, 24),
    nphot=st.integers(1, 3),
    threads=st.sampled_from([1, 2]),
    params=params_strategy,
    block_sources=st.integers(2, 30),
)
def test_property_dask_identical_to_in_memory(seed, nframes, nsources, nphot, threads, params, block_sources):
    mag, mag_err = simulate(seed, nframes, nsources, nphot)
    rng = np.random.default_rng(seed)
    chunks = tuple(_random_chunks(rng, n) for n in mag.shape)
    ids = rng.integers(0, 2**63, nsources, dtype=np.uint64)
    expected = source_statistics(mag, mag_err, params, source_ids=ids)
    with dask.config.set(scheduler="threads", num_workers=threads):
        got = source_statistics_dask(
            da.from_array(mag, chunks=chunks),
            da.from_array(mag_err, chunks=chunks),
            params,
            source_ids=ids,
            block_bytes=block_sources * 8 * nframes * nphot,
        )
    xr.testing.assert_identical(got, expected)


def test_dask_from_zarr_store(tmp_path):
    mag, mag_err = simulate(3, 60, 50, 3)
    ids = np.arange(50, dtype=np.uint64) * 1_000_003 + 2**62
    stored = xr.Dataset(
        {"mag": (DIMS, mag), "mag_err": (DIMS, mag_err)},
        coords={"source_id": ("source", ids)},
    )
    store = tmp_path / "field.zarr"
    stored.chunk({"frame": 16, "source": 12, "photometry": -1}).to_zarr(store, consolidated=False)
    ds = xr.open_zarr(store, consolidated=False)
    assert ds["mag"].data.chunks[0][0] == 16  # read lazily, chunked like the store
    expected = source_statistics(mag, mag_err, source_ids=ids)
    for threads, block_sources in ((1, 12), (2, 30), (2, 5)):
        with dask.config.set(scheduler="threads", num_workers=threads):
            got = source_statistics_dask(
                ds["mag"].data,
                ds["mag_err"].data,
                source_ids=ds["source_id"].values,
                block_bytes=block_sources * 8 * 60 * 3,
            )
        xr.testing.assert_identical(got, expected)
    # A subset of frames picked by index (e.g. the ingested ones), as the master flow does.
    frames = np.flatnonzero(np.arange(60) % 7 != 3)
    got = source_statistics_dask(ds["mag"].data[frames], ds["mag_err"].data[frames], block_bytes=10_000)
    xr.testing.assert_identical(got, source_statistics(mag[frames], mag_err[frames]))


def test_dask_float32_store_equals_float64_values():
    mag, mag_err = simulate(4, 30, 20, 2)
    mag32, err32 = mag.astype(np.float32), mag_err.astype(np.float32)
    expected = source_statistics(mag32.astype(np.float64), err32.astype(np.float64))
    xr.testing.assert_identical(source_statistics(mag32, err32), expected)
    chunks = (7, 6, 1)
    got = source_statistics_dask(da.from_array(mag32, chunks=chunks), da.from_array(err32, chunks=chunks))
    xr.testing.assert_identical(got, expected)


def test_dask_with_distributed_client():
    distributed = pytest.importorskip("distributed")
    mag, mag_err = simulate(8, 40, 30, 2)
    expected = source_statistics(mag, mag_err)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        assert outofcore._dask_worker_count() == 2
        chunks = (9, 7, 1)
        got = source_statistics_dask(
            da.from_array(mag, chunks=chunks), da.from_array(mag_err, chunks=chunks), block_bytes=8 * 40 * 12
        )
    xr.testing.assert_identical(got, expected)


def test_dask_blocks_respect_the_memory_budget(monkeypatch):
    """Every block fits the budget, and no more than ``blocks_at_once`` blocks are computed together."""
    mag, mag_err = simulate(9, 20, 50, 2)
    per_source = 8 * 20 * 2
    seen_blocks, rounds = [], []
    kernel, compute = outofcore._block_statistics, dask.compute

    def recording_kernel(m, e, params):
        seen_blocks.append(m.shape)
        return kernel(m, e, params)

    def recording_compute(*args, **kwargs):
        rounds.append(len(args))
        return compute(*args, **kwargs)

    monkeypatch.setattr(outofcore, "_block_statistics", recording_kernel)
    monkeypatch.setattr(dask, "compute", recording_compute)
    # Frame-only chunks (every chunk holds all sources): the chunks are cut into blocks.
    chunks = (4, 50, 2)
    got = source_statistics_dask(
        da.from_array(mag, chunks=chunks),
        da.from_array(mag_err, chunks=chunks),
        block_bytes=7 * per_source,
        blocks_at_once=3,
    )
    xr.testing.assert_identical(got, source_statistics(mag, mag_err))
    assert all(shape[0] == 20 and shape[1] <= 7 and shape[2] == 2 for shape in seen_blocks)
    assert sum(shape[1] for shape in seen_blocks) == 50
    assert max(rounds) <= 3


def test_plan_blocks():
    plan = outofcore._plan_blocks
    assert plan((5, 5, 5), 12) == [(0, 10), (10, 15)]  # whole chunks merged up to the budget
    assert plan((30,), 12) == [(0, 10), (10, 20), (20, 30)]  # a wide chunk cut in equal pieces
    assert plan((3, 30, 3, 3), 12) == [(0, 3), (3, 13), (13, 23), (23, 33), (33, 39)]
    assert plan((50,), 100) == [(0, 50)]


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=12), block=st.integers(1, 50))
def test_property_plan_blocks(chunks, block):
    blocks = outofcore._plan_blocks(tuple(chunks), block)
    edges = np.cumsum([0, *chunks])
    assert blocks[0][0] == 0 and blocks[-1][1] == edges[-1]
    for (_, b), (c, _) in itertools.pairwise(blocks):
        assert b == c
    for a, b in blocks:
        assert 0 < b - a <= block
        # A block starts or stops inside a chunk only when that chunk is wider than a block.
        for edge in (a, b):
            i = np.searchsorted(edges, edge, side="right") - 1
            if edge not in edges:
                assert chunks[i] > block


def test_empty_inputs():
    for shape in ((0, 4, 2), (5, 0, 2)):
        mag = np.full(shape, 12.0)
        lazy = da.from_array(mag)
        for ds in (source_statistics(mag, mag), source_statistics_dask(lazy, lazy)):
            assert ds.sizes["source"] == shape[1] and ds.sizes["photometry"] == 2
            assert (ds["full_count"].values == 0).all() and np.isnan(ds["magnitude"].values).all()
    all_missing = source_statistics(np.full((6, 3, 2), np.nan), np.full((6, 3, 2), 0.1))
    assert (all_missing["rejected_count"].values == 0).all()
    assert np.isnan(all_missing["mag_err"].values).all()


def test_dataset_layout():
    mag, mag_err = simulate(1, 12, 15, 3)
    ids = np.arange(100, 115, dtype=np.uint64)
    ds = source_statistics(mag, mag_err, RejectionParameters(4.0), source_ids=ids)
    assert list(ds.data_vars) == list(STATISTIC_NAMES)
    assert list(STATISTIC_NAMES) == [
        "full_count",
        "rejected_count",
        "magnitude",
        "mediandev",
        "medianmeddev",
        "mag_err_full_count",
        "mag_err_rejected_count",
        "mag_err",
        "mag_err_mediandev",
        "mag_err_medianmeddev",
    ]
    for name in STATISTIC_NAMES:
        assert ds[name].dims == ("source", "photometry")
        assert ds[name].dtype == (np.int64 if name.endswith("count") else np.float64)
    np.testing.assert_array_equal(ds["source_id"].values, ids)
    assert ds.attrs["outlier_threshold"] == 4.0 and ds.attrs["rejection_units"] == "meddev"
    assert "source_id" not in source_statistics(mag, mag_err).coords


# ------------------------------------------------------------------------------------------------------
# enough flags
# ------------------------------------------------------------------------------------------------------


def test_enough_flags_strict_inequality():
    counts = np.array([[10], [6], [5], [3]])  # median (5 + 6) / 2 = 5.5
    assert enough_flags(counts, 1.0)[:, 0].tolist() == [True, True, False, False]
    assert enough_flags(counts, 0.5)[:, 0].tolist() == [True, True, True, True]  # > 2.75
    ties = np.array([[4], [4], [4]])
    assert enough_flags(ties, 1.0)[:, 0].tolist() == [False, False, False]  # 4 > 4 is false
    assert enough_flags(ties, 0.5)[:, 0].tolist() == [True, True, True]


def test_enough_flags_median_over_measured_stars():
    rejected = np.array([[10, 4], [6, 0], [5, 0], [0, 8], [3, 0]])
    full = np.array([[10, 4], [6, 3], [5, 2], [0, 8], [3, 0]])
    # Photometry 0: star 3 has n = 0 and stays out of the median: median(3, 5, 6, 10) = 5.5.
    # Photometry 1: stars with n > 0 have rejected counts 4, 0, 0, 8: median 2 (star 4, n = 0, is out).
    got = enough_flags(rejected, 1.0, full_count=full)
    assert got.tolist() == [[True, True], [True, False], [False, False], [False, True], [False, False]]
    # Without full_count the stars with rejected_count > 0 are taken: photometry 1 median (4 + 8) / 2 = 6.
    got = enough_flags(rejected, 1.0)
    assert got[:, 1].tolist() == [False, False, False, True, False]
    assert got[:, 0].tolist() == [True, True, False, False, False]
    # A photometry without any measured star has no star with enough measurements.
    assert not enough_flags(np.zeros((4, 2), dtype=np.int64)).any()
    # One photometry as a 1-D array.
    assert enough_flags(np.array([10, 6, 5, 0, 3]), 1.0).tolist() == [True, True, False, False, False]


def test_enough_flags_default_fraction():
    counts = np.array([[100], [80], [41], [40], [39]])  # median 41 -> min_counts 20.5
    assert enough_flags(counts)[:, 0].tolist() == [True] * 5
    counts = np.array([[100], [80], [60], [30], [29]])  # median 60 -> min_counts 30
    assert enough_flags(counts)[:, 0].tolist() == [True, True, True, False, False]


# ------------------------------------------------------------------------------------------------------
# Bad parameters
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"outlier_threshold": 0}, "outlier_threshold"),
        ({"outlier_threshold": -1.0}, "outlier_threshold"),
        ({"outlier_threshold": float("nan")}, "outlier_threshold"),
        ({"outlier_threshold": float("inf")}, "outlier_threshold"),
        ({"outlier_threshold": "5"}, "outlier_threshold"),
        ({"outlier_threshold": True}, "outlier_threshold"),
        ({"max_rejection_iterations": -1}, "max_rejection_iterations"),
        ({"max_rejection_iterations": 2.5}, "max_rejection_iterations"),
        ({"max_rejection_iterations": None}, "max_rejection_iterations"),
        ({"rejection_center": "mode"}, "rejection_center"),
        ({"rejection_center": "Median"}, "rejection_center"),
        ({"rejection_units": "sigma"}, "rejection_units"),
        ({"rejection_units": None}, "rejection_units"),
    ],
)
def test_bad_rejection_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RejectionParameters(**kwargs)


def test_parameters_are_normalised():
    params = RejectionParameters(outlier_threshold=np.int64(3), max_rejection_iterations=np.int32(4))
    assert type(params.outlier_threshold) is float and params.outlier_threshold == 3.0
    assert type(params.max_rejection_iterations) is int and params.max_rejection_iterations == 4
    assert params == RejectionParameters(3.0, 4)


def test_bad_arguments():
    mag = np.zeros((3, 2, 1))
    with pytest.raises(ValueError, match="min_nobs_median_fraction"):
        enough_flags(np.ones((3, 1)), -0.5)
    with pytest.raises(ValueError, match="min_nobs_median_fraction"):
        enough_flags(np.ones((3, 1)), float("nan"))
    with pytest.raises(ValueError, match="full_count"):
        enough_flags(np.ones((3, 1)), 0.5, full_count=np.ones((2, 1)))
    with pytest.raises(ValueError, match="block_bytes"):
        source_statistics_dask(mag, mag, block_bytes=0)
    with pytest.raises(ValueError, match="blocks_at_once"):
        source_statistics_dask(mag, mag, blocks_at_once=0)
    with pytest.raises(ValueError, match="same shape"):
        source_statistics(mag, np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        source_statistics_dask(mag, np.zeros((3, 3, 1)))
    with pytest.raises(ValueError, match="source_ids"):
        source_statistics(mag, mag, source_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="values"):
        rejected_statistics(np.zeros(5))
    with pytest.raises(TypeError, match="RejectionParameters"):
        rejected_statistics(np.zeros((5, 1)), {"outlier_threshold": 5})


@pytest.mark.parametrize(("center", "units"), itertools.product(CENTERS, UNITS))
@pytest.mark.parametrize("iterations", [0, 1, 10])
def test_kept_ranges_say_which_measurements_the_rejection_kept(center, units, iterations):
    """The kept set of the literal reference is exactly the measurements within [low, high] (what the light
    curves' outlier flag is made of)."""
    params = RejectionParameters(2.5, iterations, center, units)
    mag, mag_err = simulate(7, 40, 30, 2)
    low, high = kept_ranges(mag, mag_err, params)
    for s, p in itertools.product(range(mag.shape[1]), range(mag.shape[2])):
        usable = [
            float(mag[f, s, p])
            for f in range(mag.shape[0])
            if math.isfinite(mag[f, s, p]) and math.isfinite(mag_err[f, s, p]) and mag_err[f, s, p] > 0
        ]
        _, kept = ref_kept(usable, params)
        inside = sorted(x for x in usable if low[s, p] <= x <= high[s, p])
        assert inside == sorted(kept), (s, p)
        assert math.isnan(low[s, p]) == (not kept)
