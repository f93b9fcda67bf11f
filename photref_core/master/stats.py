"""Per-source statistics with iterative outlier rejection (SPEC section 3).

For every source and photometry, the finite measurements X over all frames are reduced to a rejected
centre and two scatter estimates, following FITSH ``grcollect`` as AutoWISP uses it:

* ``K = X``; repeat at most ``max_rejection_iterations`` times: ``c = center(K)``, ``u = unit(K, c)``;
  stop if ``u == 0`` or ``K`` is empty; ``K' = {x in X : |x - c| <= T u}`` (chosen from *all* of X, so a
  point can come back); stop if ``K' == K``; ``K = K'``.
* From the final K, with its centre recomputed: ``rejected_count = |K|`` (AutoWISP's name for the number
  *kept*), the centre, ``mediandev = sqrt(sum_K (x - c)^2 / |K|)`` and ``medianmeddev = median_K |x - c|``.

The median of m sorted values ``a`` is ``(a[(m - 1) // 2] + a[m // 2]) / 2``.

Implementation
--------------
Everything is vectorised over (source, photometry) pairs; only the rejection iterations and the steps of
binary searches are Python loops. Each pair's measurements are sorted once (NaN last). With a median or
mean centre the kept set ``{x in X : |x - c| <= t}`` is always a contiguous run of the sorted values
(``x -> |x - c|`` is monotone on either side of c, also in floating point), so K is held as a pair of
index bounds ``[lo, hi)`` per pair:

* the median of K is an index lookup;
* the median of ``|x - c|`` over K is a selection from two sorted sequences (the values below c read
  backwards and the values from c up), found by binary search without sorting anything again;
* the new bounds are found by binary search with the very predicate ``abs(x - c) <= T * u`` of the
  definition, so the kept set is exactly the one of a literal implementation;
* sums (mean centre, ``stddev`` unit, ``mediandev``) are taken over the run only
  (``numpy.add.reduceat``), of deviations from a point inside K, never as ``E[x^2] - E[x]^2``; the mean is
  computed in two passes (the second corrects the first by the mean residual), so it is the correctly
  rounded mean in all but rare ties and exactly ``x`` when all kept values equal ``x``.

Every pair is computed independently of every other one, so the numbers do not depend on how the sources
are split into blocks: :func:`photref_core.master.outofcore.source_statistics_dask` gives exactly the
results of :func:`source_statistics`, with any chunking and any number of workers.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from ..checks import check_choice, check_count, check_positive_finite

if TYPE_CHECKING:  # xarray (and pandas under it) costs ~0.35 s to import: only where it is used
    import xarray as xr

__all__ = [
    "STATISTIC_NAMES",
    "RejectionParameters",
    "enough_flags",
    "kept_ranges",
    "rejected_statistics",
    "source_statistics",
]

RejectionCenter = Literal["median", "mean"]
RejectionUnits = Literal["stddev", "meddev", "absolute"]
REJECTION_CENTERS = get_args(RejectionCenter)
REJECTION_UNITS = get_args(RejectionUnits)


_KEYS = ("full_count", "rejected_count", "center", "mediandev", "medianmeddev")
_MAG_NAMES = ("full_count", "rejected_count", "magnitude", "mediandev", "medianmeddev")
_ERR_NAMES = (
    "mag_err_full_count",
    "mag_err_rejected_count",
    "mag_err",
    "mag_err_mediandev",
    "mag_err_medianmeddev",
)
STATISTIC_NAMES = _MAG_NAMES + _ERR_NAMES
"""Names of the data variables of the datasets returned by :func:`source_statistics`, in order."""


@dataclass(frozen=True)
class RejectionParameters:
    """Parameters of the iterative outlier rejection (SPEC section 3).

    Parameters
    ----------
    outlier_threshold : float, default 5.0
        T: a value is kept when ``|x - c| <= T * u``. A positive finite number.
    max_rejection_iterations : int, default 10
        Most rejection iterations; 0 keeps every finite value (no rejection).
    rejection_center : {'median', 'mean'}, default 'median'
        The centre c of the kept values.
    rejection_units : {'stddev', 'meddev', 'absolute'}, default 'meddev'
        The unit u of the threshold: ``sqrt(mean((x - c)^2))``, ``median(|x - c|)`` or 1.

    Raises
    ------
    ValueError
        When a parameter is out of range; the message names the parameter.
    """

    outlier_threshold: float = 5.0
    max_rejection_iterations: int = 10
    rejection_center: RejectionCenter = "median"
    rejection_units: RejectionUnits = "meddev"

    def __post_init__(self):
        object.__setattr__(
            self, "outlier_threshold", check_positive_finite("outlier_threshold", self.outlier_threshold)
        )
        object.__setattr__(
            self,
            "max_rejection_iterations",
            check_count("max_rejection_iterations", self.max_rejection_iterations),
        )
        check_choice("rejection_center", self.rejection_center, REJECTION_CENTERS)
        check_choice("rejection_units", self.rejection_units, REJECTION_UNITS)

    def as_attrs(self) -> dict:
        """Return the parameters as a plain dict (for dataset attributes and headers)."""
        return dataclasses.asdict(self)


def _check_shapes(mag, mag_err):
    """``mag`` and ``mag_err`` (numpy or dask arrays) when both are (frame, source, photometry) alike."""
    if mag.ndim != 3 or mag_err.shape != mag.shape:
        raise ValueError(
            "mag and mag_err must have the same shape (frame, source, photometry), "
            f"got {mag.shape} and {mag_err.shape}"
        )
    return mag, mag_err


def _check_params(params) -> RejectionParameters:
    if params is None:
        return RejectionParameters()
    if not isinstance(params, RejectionParameters):
        raise TypeError(f"params must be a RejectionParameters, got {type(params).__name__}")
    return params


# ----------------------------------------------------------------------------------------------------------
# Vectorised building blocks. Rows are the (source, photometry) pairs; ``a`` is (nrows, nframes), each row
# sorted ascending with the NaNs (missing measurements) last; ``flat`` is ``a.ravel()`` and ``base`` the
# flat offset of each row considered.
# ----------------------------------------------------------------------------------------------------------


def _search(lo: np.ndarray, hi: np.ndarray, pred: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Smallest i in [lo, hi] with ``pred(i)`` true (``hi`` when none), per row, by bisection.

    ``pred`` must be monotone (false ... false true ... true) on [lo, hi) and is only trusted for
    ``lo <= i < hi``; it may be called with ``i == hi`` for rows already done, and must not fail then.
    """
    lo = lo.copy()
    hi = hi.copy()
    span = int((hi - lo).max()) if lo.size else 0
    for _ in range(span.bit_length()):
        mid = (lo + hi) >> 1
        left = pred(mid) | (lo >= hi)
        hi = np.where(left, mid, hi)
        lo = np.where(left, lo, mid + 1)
    return lo


def _gather(flat: np.ndarray, base: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``a[row, index]``; an index outside the row reads a neighbour's (or a clipped) value, never used."""
    return flat.take(base + index, mode="clip")


def _segment_sums(
    rows: np.ndarray, offset: np.ndarray, lo: np.ndarray, hi: np.ndarray, square: bool, out: np.ndarray
) -> np.ndarray:
    """Per row, the sum over ``[lo, hi)`` (non-empty) of ``rows - offset`` or of its square.

    Only the run itself is summed (``numpy.add.reduceat``), so a row's result does not depend on the other
    rows or on the values outside its run. ``out`` (C-contiguous, the shape of ``rows``; may be ``rows``
    itself when it is no longer needed) receives the deviations.
    """
    nrows, nframes = rows.shape
    np.subtract(rows, offset[:, None], out=out)
    if square:
        np.multiply(out, out, out=out)
    flat = out.reshape(-1)
    starts = np.arange(nrows, dtype=np.intp) * nframes
    bounds = np.empty(2 * nrows, dtype=np.intp)
    bounds[0::2] = starts + lo
    bounds[1::2] = starts + hi
    if bounds[-1] == flat.size:  # reduceat sums the last segment up to the end of the array
        bounds = bounds[:-1]
    return np.add.reduceat(flat, bounds)[0::2]


def _center(flat, rows, base, lo, hi, center, work) -> np.ndarray:
    """Median or mean of the non-empty runs ``a[row, lo:hi]`` (``rows``, ``work``: see _segment_sums)."""
    size = hi - lo
    if center == "median":
        low = _gather(flat, base, lo + (size - 1) // 2)
        return (low + _gather(flat, base, lo + size // 2)) / 2
    shift = _gather(flat, base, lo)
    first = shift + _segment_sums(rows, shift, lo, hi, False, work) / size
    return first + _segment_sums(rows, first, lo, hi, False, work) / size


def _kth_abs_deviation(flat, base, lo, split, hi, c, k) -> np.ndarray:
    """The k-th smallest (0-based) of ``|x - c|`` over the run ``a[row, lo:hi]``.

    ``split`` is the first index of the run with ``x >= c``: the deviations of ``a[lo:split]`` read
    backwards (L) and of ``a[split:hi]`` read forwards (R) are two sorted sequences; bisect on how many of
    the k + 1 smallest come from L.
    """
    n_left = split - lo
    n_right = hi - split
    kp1 = k + 1

    def pred(i):
        j = kp1 - i
        left_i = np.abs(_gather(flat, base, split - 1 - i) - c)
        right_jm1 = np.abs(_gather(flat, base, split + j - 1) - c)
        return (i >= n_left) | (j <= 0) | (right_jm1 <= left_i)

    i = _search(np.maximum(0, kp1 - n_right), np.minimum(kp1, n_left), pred)
    j = kp1 - i
    from_left = np.where(i > 0, np.abs(_gather(flat, base, split - i) - c), -np.inf)
    from_right = np.where(j > 0, np.abs(_gather(flat, base, split + j - 1) - c), -np.inf)
    return np.maximum(from_left, from_right)


def _median_abs_deviation(flat, base, lo, hi, c) -> np.ndarray:
    """``median(|x - c|)`` over the non-empty runs ``a[row, lo:hi]`` (c within the run's range)."""
    split = _search(lo, hi, lambda i: _gather(flat, base, i) >= c)
    size = hi - lo
    low = _kth_abs_deviation(flat, base, lo, split, hi, c, (size - 1) // 2)
    high = _kth_abs_deviation(flat, base, lo, split, hi, c, size // 2)
    return (low + high) / 2


def _kept_runs(a: np.ndarray, n: np.ndarray, params: RejectionParameters) -> tuple[np.ndarray, np.ndarray]:
    """The final kept set K of every row of ``a`` (sorted ascending, NaN last, ``n`` finite values each),
    as index bounds ``[lo, hi)`` into the sorted row: the iterative rejection itself. ``a`` is only read.
    """
    nrows, nframes = a.shape
    flat = a.ravel()
    all_base = np.arange(nrows, dtype=np.intp) * nframes
    n = n.astype(np.intp)
    lo = np.zeros(nrows, dtype=np.intp)
    hi = n.copy()
    threshold = params.outlier_threshold
    center = params.rejection_center
    units = params.rejection_units

    active = np.flatnonzero(n > 0)
    for _ in range(params.max_rejection_iterations):
        active = active[hi[active] > lo[active]]  # K empty: stop
        if active.size == 0:
            break
        base = all_base[active]
        row_lo, row_hi = lo[active], hi[active]
        rows = work = None
        if center == "mean" or units == "stddev":
            rows = a[active]
            work = np.empty_like(rows)
        c = _center(flat, rows, base, row_lo, row_hi, center, work)
        if units == "absolute":
            u = np.ones_like(c)
        elif units == "stddev":
            u = np.sqrt(_segment_sums(rows, c, row_lo, row_hi, True, work) / (row_hi - row_lo))
        else:
            u = _median_abs_deviation(flat, base, row_lo, row_hi, c)
        going = u != 0  # u == 0: stop
        active, base, row_lo, row_hi, c, u = (x[going] for x in (active, base, row_lo, row_hi, c, u))
        if active.size == 0:
            break
        t = threshold * u
        row_n = n[active]

        def first_in(i, base=base, c=c, t=t):
            x = _gather(flat, base, i)
            return (x >= c) | (np.abs(x - c) <= t)

        def first_out_above(i, base=base, c=c, t=t):
            x = _gather(flat, base, i)
            return (x > c) & (np.abs(x - c) > t)

        new_lo = _search(np.zeros_like(row_n), row_n, first_in)
        new_hi = _search(new_lo, row_n, first_out_above)
        changed = (new_lo != row_lo) | (new_hi != row_hi)  # K' == K: stop
        active = active[changed]
        lo[active] = new_lo[changed]
        hi[active] = new_hi[changed]
    return lo, hi


def _sorted_row_statistics(a: np.ndarray, n: np.ndarray, params: RejectionParameters) -> dict:
    """Rejected statistics of every row of ``a`` (sorted ascending, NaN last, ``n`` finite values each).

    ``a`` (C-contiguous) is overwritten.
    """
    nrows, nframes = a.shape
    flat = a.ravel()
    all_base = np.arange(nrows, dtype=np.intp) * nframes
    center = params.rejection_center
    lo, hi = _kept_runs(a, n, params)
    kept = hi - lo
    center_out = np.full(nrows, np.nan)
    mediandev = np.full(nrows, np.nan)
    medianmeddev = np.full(nrows, np.nan)
    done = np.flatnonzero(kept > 0)
    if done.size:
        every_row = done.size == nrows
        base = all_base[done]
        row_lo, row_hi = lo[done], hi[done]
        rows = a if every_row else a[done]
        work = np.empty_like(rows) if center == "mean" else None
        c = _center(flat, rows, base, row_lo, row_hi, center, work)
        center_out[done] = c
        medianmeddev[done] = _median_abs_deviation(flat, base, row_lo, row_hi, c)
        squares = _segment_sums(rows, c, row_lo, row_hi, True, rows)  # a is not needed any more
        mediandev[done] = np.sqrt(squares / (row_hi - row_lo))
    return {
        "full_count": n.astype(np.int64),
        "rejected_count": kept.astype(np.int64),
        "center": center_out,
        "mediandev": mediandev,
        "medianmeddev": medianmeddev,
    }


def rejected_statistics(
    values: np.ndarray, params: RejectionParameters | None = None
) -> dict[str, np.ndarray]:
    """Statistics with iterative rejection of every column of ``values`` (SPEC section 3).

    Parameters
    ----------
    values : array_like, shape (nframes, nsources)
        Measurements, one column per source; NaN (or any non-finite value) marks a missing measurement.
    params : RejectionParameters, optional
        Rejection parameters; the defaults when omitted.

    Returns
    -------
    dict of str to numpy.ndarray
        Arrays of shape (nsources,): ``full_count`` (int64, n, the number of finite values),
        ``rejected_count`` (int64, the number *kept*, AutoWISP's name), ``center`` (the rejected median or
        mean), ``mediandev`` (``sqrt(sum_K (x - c)^2 / |K|)``) and ``medianmeddev`` (``median_K |x - c|``),
        float64. ``n = 0``: counts 0 and NaN; final K empty: ``rejected_count`` 0 and NaN.
    """
    params = _check_params(params)
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must have shape (nframes, nsources), got shape {values.shape}")
    a = np.array(values.T, dtype=np.float64, order="C", copy=True)
    missing = ~np.isfinite(a)
    np.copyto(a, np.nan, where=missing)
    a.sort(axis=-1)
    n = a.shape[1] - np.count_nonzero(missing, axis=-1)
    return _sorted_row_statistics(a, n, params)


def kept_ranges(mag, mag_err, params: RejectionParameters | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which measurements the magnitude statistics kept: per source and photometry, the smallest and the
    largest value of the final kept set K (SPEC section 3).

    K is a run of the sorted values whose ends are decided by the value alone (``|x - c| <= T u``), so a
    measurement that is not missing was kept exactly when ``low <= x <= high``; every other one was
    rejected as an outlier. The rejection is the very one of :func:`source_statistics` (same missing
    rule, same iterations), so ``rejected_count`` is the number of measurements in the range.

    Parameters
    ----------
    mag, mag_err : array_like, shape (frame, source, photometry)
        As :func:`source_statistics` takes them.
    params : RejectionParameters, optional
        Rejection parameters; the defaults when omitted.

    Returns
    -------
    low, high : numpy.ndarray, shape (source, photometry)
        float64; NaN where nothing was kept.
    """
    params = _check_params(params)
    mag, mag_err = _check_shapes(np.asarray(mag), np.asarray(mag_err))
    nframes, nsources, nphot = mag.shape
    rows = np.empty((nphot, nsources, nframes))
    np.copyto(rows, mag.transpose(2, 1, 0), casting="same_kind")
    missing = _unusable(rows, False) | _unusable(mag_err.transpose(2, 1, 0), True)
    rows[missing] = np.nan
    rows = rows.reshape(nphot * nsources, nframes)
    rows.sort(axis=-1)
    n = nframes - np.count_nonzero(missing.reshape(rows.shape), axis=-1)
    lo, hi = _kept_runs(rows, n, params)
    index = np.arange(rows.shape[0])
    some = hi > lo
    low = np.where(some, rows[index, np.minimum(lo, nframes - 1)], np.nan)
    high = np.where(some, rows[index, np.maximum(hi - 1, 0)], np.nan)
    return low.reshape(nphot, nsources).T.copy(), high.reshape(nphot, nsources).T.copy()


def _unusable(values: np.ndarray, positive: bool) -> np.ndarray:
    """Where values cannot be used: not finite; with ``positive`` also <= 0 (mag_err, SPEC 1.1). A
    measurement is missing when its mag or its mag_err is unusable."""
    unusable = ~np.isfinite(values)
    if positive:
        with np.errstate(invalid="ignore"):
            unusable |= ~(values > 0)
    return unusable


def _in_parallel(calls: list[Callable[[], object]], threads: int) -> list:
    """Results of the calls, computed on up to ``threads`` threads (in this thread when 1).

    Used for the independent mag and mag_err halves of the work: numpy releases the GIL while it copies,
    compares and sorts large arrays, so two threads take about half the time of one.
    """
    if threads <= 1 or len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=min(threads, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def _default_threads() -> int:
    return min(2, os.cpu_count() or 1)


def _statistics_arrays(mag, mag_err, params: RejectionParameters, threads: int = 1) -> tuple[dict, dict]:
    """Statistics of mag and mag_err (frame, source, photometry) -> two dicts of (source, photometry).

    mag and mag_err are independent after the shared missing mask, so with ``threads`` >= 2 they are
    transposed, sorted and reduced each on its own thread (the numbers do not depend on ``threads``).
    """
    mag, mag_err = _check_shapes(np.asarray(mag), np.asarray(mag_err))
    nframes, nsources, nphot = mag.shape

    def rows_of(values, positive: bool):
        """(photometry, source, frame): one row per (source, photometry) pair, frames contiguous; and
        where the values cannot be used (not finite; with ``positive`` also <= 0: mag_err, SPEC 1.1)."""
        rows = np.empty((nphot, nsources, nframes))
        np.copyto(rows, values.transpose(2, 1, 0), casting="same_kind")
        unusable = _unusable(rows, positive)
        return rows.reshape(nphot * nsources, nframes), unusable.reshape(nphot * nsources, nframes)

    (m, missing), (e, missing_err) = _in_parallel(
        [lambda: rows_of(mag, False), lambda: rows_of(mag_err, True)], threads
    )
    # SPEC 1.1: a measurement is missing when either value is unusable; excluded from both statistics.
    missing |= missing_err
    del missing_err
    n = nframes - np.count_nonzero(missing, axis=-1)

    def statistics_of(rows):
        np.copyto(rows, np.nan, where=missing)
        rows.sort(axis=-1)
        stats = _sorted_row_statistics(rows, n, params)
        return {k: np.ascontiguousarray(v.reshape(nphot, nsources).T) for k, v in stats.items()}

    stats_mag, stats_err = _in_parallel([lambda: statistics_of(m), lambda: statistics_of(e)], threads)
    return stats_mag, stats_err


def _dataset(stats_mag: dict, stats_err: dict, params: RejectionParameters, source_ids) -> xr.Dataset:
    data_vars = {}
    for names, stats in ((_MAG_NAMES, stats_mag), (_ERR_NAMES, stats_err)):
        for name, key in zip(names, _KEYS, strict=True):
            data_vars[name] = (("source", "photometry"), stats[key])
    coords = {}
    if source_ids is not None:
        source_ids = np.asarray(source_ids)
        nsources = stats_mag["full_count"].shape[0]
        if source_ids.shape != (nsources,):
            raise ValueError(f"source_ids must have shape ({nsources},), got {source_ids.shape}")
        coords["source_id"] = ("source", source_ids)
    import xarray as xr

    return xr.Dataset(data_vars, coords=coords, attrs=params.as_attrs())


def source_statistics(
    mag: np.ndarray,
    mag_err: np.ndarray,
    params: RejectionParameters | None = None,
    source_ids=None,
    threads: int | None = None,
) -> xr.Dataset:
    """Per-source, per-photometry statistics of magnitudes and their errors, in memory (SPEC section 3).

    Parameters
    ----------
    mag, mag_err : array_like, shape (frame, source, photometry)
        Magnitudes and their errors. A measurement is missing (SPEC 1.1) when its mag or mag_err is not
        finite or its mag_err <= 0; it is left out of both the mag and the mag_err statistics.
    params : RejectionParameters, optional
        Rejection parameters; the defaults when omitted.
    source_ids : array_like, shape (source,), optional
        Added as the ``source_id`` coordinate.
    threads : int, optional
        Threads for the mag and the mag_err halves of the work (default: 2 where there are 2 cores);
        the results do not depend on it.

    Returns
    -------
    xarray.Dataset
        Dimensions (source, photometry); from mag: ``full_count``, ``rejected_count`` (int64; the number
        kept), ``magnitude`` (the rejected centre), ``mediandev``, ``medianmeddev`` (float64); from mag_err,
        with its own rejection over the same measurements: ``mag_err_full_count``,
        ``mag_err_rejected_count``, ``mag_err`` (the star's typical error), ``mag_err_mediandev``,
        ``mag_err_medianmeddev``. The attributes hold the rejection parameters.
    """
    params = _check_params(params)
    threads = _default_threads() if threads is None else threads
    stats_mag, stats_err = _statistics_arrays(mag, mag_err, params, threads)
    return _dataset(stats_mag, stats_err, params, source_ids)


def enough_flags(rejected_count, min_nobs_median_fraction: float = 0.5, full_count=None) -> np.ndarray:
    """Whether each star has enough kept measurements to enter the scatter fit and the master.

    Per photometry: ``min_counts = min_nobs_median_fraction * median(rejected_count)``, the median taken
    over the stars with n > 0; ``enough = rejected_count > min_counts`` (strict). A photometry without any
    measured star has no star with enough measurements.

    Parameters
    ----------
    rejected_count : array_like of int, shape (source,) or (source, photometry)
        Number of kept measurements per star (and photometry).
    min_nobs_median_fraction : float, default 0.5
        The fraction of the median; a finite number >= 0.
    full_count : array_like of int, optional
        n, the number of measurements, same shape as ``rejected_count``: selects the stars with n > 0 as
        SPEC section 3 says. When omitted, the stars with ``rejected_count > 0`` are used, which is the
        same except for stars whose final kept set is empty (possible with ``absolute`` units).

    Returns
    -------
    numpy.ndarray of bool
        Same shape as ``rejected_count``.
    """
    fraction = min_nobs_median_fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not np.isfinite(fraction)
        or fraction < 0
    ):
        raise ValueError(f"min_nobs_median_fraction must be a finite number >= 0, got {fraction!r}")
    counts = np.asarray(rejected_count)
    if counts.ndim not in (1, 2):
        raise ValueError(
            f"rejected_count must have shape (source,) or (source, photometry), got {counts.shape}"
        )
    if full_count is None:
        measured = counts > 0
    else:
        full = np.asarray(full_count)
        if full.shape != counts.shape:
            raise ValueError(
                f"full_count must have the shape of rejected_count {counts.shape}, got {full.shape}"
            )
        measured = full > 0
    squeeze = counts.ndim == 1
    counts2 = counts.reshape(counts.shape[0], -1)
    measured2 = measured.reshape(counts2.shape)
    min_counts = np.full(counts2.shape[1], np.nan)
    for p in range(counts2.shape[1]):
        selected = np.sort(counts2[measured2[:, p], p].astype(np.float64))
        m = selected.size
        if m:
            min_counts[p] = fraction * ((selected[(m - 1) // 2] + selected[m // 2]) / 2)
    enough = counts2 > min_counts[None, :]
    return enough[:, 0] if squeeze else enough
