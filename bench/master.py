"""Benchmark: statistics + scatter fit + master FITS (the master-photref science, without Prefect).

What it measures, on this machine (2 cores, 24 GiB, Python 3.11; printed at the top of the output):

1. AutoWISP's 'big' shape, 1,120 frames x 896 stars x 7 photometries (float64, 2 % outliers, 1 % NaN):
   * ``photref`` in memory: :func:`photref_core.stats.source_statistics` on numpy arrays, then the
     enough flags, the scatter fit of every photometry and the master + statistics-table FITS;
   * ``photref`` science in memory: statistics, scatter fit and the master FITS from the numpy arrays
     (``source_statistics``, ``scatter_fit_dataset``, ``write_master``), no store;
   * ``photref`` through the store: the same from a zarr store on disk (read straight into memory when the
     store fits in one source block, as here; results written back into the store as xarray groups and
     read back by the next step; the statistics table too), i.e. the three steps of the master flow;
   * baselines in the same process: a plain in-memory numpy implementation of the same statistics
     (``np.nanmedian`` over the frame axis with masks, one pass per rejection iteration), and a per-star
     Python loop with ``np.median`` (on a subset, scaled up);
   * np.median throughput on the same number of values (the cost of the selections themselves).
   Target: under 0.5 s for statistics + fit + master (AutoWISP's generate_master on the same shape is
   measured, beside photref, by ``bench/cli.py --full``).
2. 10^9 measurements out of core: 2,000 frames x 100,000 stars x 5 photometries, float32 (8 GB of mag
   and mag_err on disk), statistics over source blocks with dask threads; wall time, measurements/s and
   peak RSS (sampled). Target: under 3 minutes with peak RSS under 4 GiB. ``--large-frames``,
   ``--large-stars`` scale it; ``--quick`` runs a small smoke version of both parts.

The store of part 2 is written once into ``bench-output/master/`` (git-ignored) and reused.

Run: ``.venv/bin/python bench/master.py [--quick] [--skip-large]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import PeakRSS, load_average, machine_description, print_table  # noqa: E402
from photref_core.catalog import read_catalog
from photref_core.ingest.arrays import store_from_arrays
from photref_core.ingest.readers import valid_measurements
from photref_core.master.fits import write_master
from photref_core.master.outofcore import DEFAULT_BLOCK_MIB
from photref_core.master.parameters import MasterParameters, master_header
from photref_core.master.stats import RejectionParameters, source_statistics
from photref_core.master.steps import (
    compute_statistics,
    fit_statistics,
    merge_results,
    scatter_fit_dataset,
    write_products,
)

OUT = Path(__file__).resolve().parent.parent / "bench-output" / "master"


def synthetic(nframes, nstars, nphot, seed=0, dtype=np.float64):
    """Magnitudes with noise growing with magnitude, 2 % outliers, 1 % missing."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(8, 16, nstars)
    sigma = np.hypot(0.003, 0.005 * 10 ** (0.4 * (true - 12)))
    mag = true[None, :, None] + rng.normal(size=(nframes, nstars, nphot)) * sigma[None, :, None]
    outlier = rng.random(mag.shape) < 0.02
    mag[outlier] += rng.uniform(-2, 2, outlier.sum())
    mag[rng.random(mag.shape) < 0.01] = np.nan
    err = np.broadcast_to(sigma[None, :, None], mag.shape) * rng.uniform(0.9, 1.1, mag.shape)
    return mag.astype(dtype), err.astype(dtype), true


def catalog_for(true, path):
    from astropy.table import Table

    ids = np.arange(1, true.size + 1, dtype=np.uint64) * 1_000_003 + 4_000_000_000_000_000_000
    Table({"source_id": ids, "phot_g_mean_mag": true}).write(path, overwrite=True)
    return ids


def numpy_baseline(mag, err, params: RejectionParameters):
    """The obvious in-memory numpy implementation: masked nanmedian over frames per iteration (SPEC 3)."""
    out = []
    good = valid_measurements(mag, err)
    for values in (np.where(good, mag, np.nan), np.where(good, err, np.nan)):
        kept = np.isfinite(values)
        for _ in range(params.max_rejection_iterations):
            k = np.where(kept, values, np.nan)
            c = np.nanmedian(k, axis=0)
            u = np.nanmedian(np.abs(k - c), axis=0)
            new = np.isfinite(values) & (np.abs(values - c) <= params.outlier_threshold * u)
            new |= ~(u > 0) & kept  # u == 0 (or no data): stop for that pair
            if np.array_equal(new, kept):
                break
            kept = new
        k = np.where(kept, values, np.nan)
        c = np.nanmedian(k, axis=0)
        out.append((kept.sum(axis=0), c, np.nanmedian(np.abs(k - c), axis=0)))
    return out


def loop_baseline(mag, err, params: RejectionParameters, n_pairs: int):
    """Per-star Python loop with np.median, on the first ``n_pairs`` (star, photometry) pairs."""
    done = 0
    for s in range(mag.shape[1]):
        for p in range(mag.shape[2]):
            x = mag[:, s, p]
            x = x[np.isfinite(x) & np.isfinite(err[:, s, p]) & (err[:, s, p] > 0)]
            kept = x
            for _ in range(params.max_rejection_iterations):
                c = np.median(kept)
                u = np.median(np.abs(kept - c))
                if u == 0 or kept.size == 0:
                    break
                new = x[np.abs(x - c) <= params.outlier_threshold * u]
                if new.size == kept.size:
                    break
                kept = new
            done += 1
            if done >= n_pairs:
                return done
    return done


def part_big(nframes, nstars, nphot, workdir: Path, repeat: int = 3):
    mag, err, true = synthetic(nframes, nstars, nphot)
    workdir.mkdir(parents=True, exist_ok=True)
    catalog = workdir / "catalog.fits"
    ids = catalog_for(true, catalog)
    params = MasterParameters()
    n_meas = mag.size
    rows = []

    def best(fn):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        return min(times), result

    t_stats, stats = best(lambda: source_statistics(mag, err, params.rejection(), source_ids=ids))

    def science_in_memory():
        """Statistics, scatter fit and master FITS straight from the arrays (no store, no table, no plots)."""
        from astropy.table import Table

        stats = source_statistics(mag, err, params.rejection(), source_ids=ids)
        stats["in_catalog"] = ("source", np.ones(nstars, bool))
        fit = scatter_fit_dataset(stats, read_catalog(catalog), params)
        frames = Table({"frame_id": [f"f{i:05d}" for i in range(nframes)], "path": ["-"] * nframes})
        frames["included"] = True
        header = master_header(workdir / "none.zarr", params, nframes)
        return write_master(workdir / "memory_master.fits", merge_results(stats, fit), frames, header)

    t_science, _ = best(science_in_memory)

    # The whole chain through the store (statistics from zarr with dask, fit, master FITS, no plots).
    store = workdir / "big.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(workdir / "big.zarr.lock", ignore_errors=True)
    store_from_arrays(
        store,
        ids,
        [f"f{i:05d}" for i in range(nframes)],
        n_photometries=nphot,
        fill=lambda f0, f1: (mag[f0:f1], err[f0:f1]),
    )

    def chain():
        g = compute_statistics(store, params)
        f = fit_statistics(store, g, catalog, params)
        return write_products(store, g, f, catalog, workdir / "big_master.fits", params, plots=False)

    t_stat_store, _ = best(lambda: compute_statistics(store, params))
    t_chain, products = best(chain)
    t_numpy, _ = best(lambda: numpy_baseline(mag, err, params.rejection()))
    n_pairs = 400
    t0 = time.perf_counter()
    loop_baseline(mag, err, params.rejection(), n_pairs)
    t_loop = (time.perf_counter() - t0) * (nstars * nphot / n_pairs) * 2  # mag and mag_err
    flat = np.ascontiguousarray(mag.reshape(nframes, -1).T)
    t_median, _ = best(lambda: np.median(flat, axis=1))

    rows.append(["photref statistics, in memory", t_stats, n_meas / t_stats / 1e6, 1.0])
    rows.append(
        [
            "photref statistics + fit + master, in memory",
            t_science,
            n_meas / t_science / 1e6,
            t_science / t_stats,
        ]
    )
    rows.append(
        [
            "photref statistics, from the store",
            t_stat_store,
            n_meas / t_stat_store / 1e6,
            t_stat_store / t_stats,
        ]
    )
    rows.append(
        ["photref statistics + fit + master, store", t_chain, n_meas / t_chain / 1e6, t_chain / t_stats]
    )
    rows.append(
        ["baseline: plain numpy (nanmedian/iteration)", t_numpy, n_meas / t_numpy / 1e6, t_numpy / t_stats]
    )
    rows.append(["baseline: per-star loop (scaled)", t_loop, n_meas / t_loop / 1e6, t_loop / t_stats])
    rows.append(["np.median of mag alone (one pass)", t_median, n_meas / t_median / 1e6, t_median / t_stats])
    print_table(
        [[name, f"{t:.3f}", f"{rate:.1f}", f"{ratio:.2f}x"] for name, t, rate, ratio in rows],
        ["step", f"seconds (best of {repeat})", "M meas/s", "vs photref in memory"],
        title=f"AutoWISP 'big' shape: {nframes} frames x {nstars} stars x {nphot} photometries "
        f"({n_meas / 1e6:.1f} M measurements)",
    )
    print(f"stars in master per photometry: {[r['stars_in_master'] for r in products['photometries']]}")
    print(
        f"target: statistics + fit + master under 0.5 s -> through the store {t_chain:.3f} s "
        f"({'met' if t_chain < 0.5 else 'MISSED'}); the science in memory {t_science:.3f} s "
        f"({'met' if t_science < 0.5 else 'MISSED'})"
    )
    return t_chain


def part_large(nframes, nstars, nphot, workdir: Path, block_mib: int):
    store = workdir / f"large_{nframes}x{nstars}x{nphot}.zarr"
    n_meas = nframes * nstars * nphot
    if not (store / "zarr.json").exists():
        shutil.rmtree(store, ignore_errors=True)
        rng_true = np.random.default_rng(1).uniform(8, 16, nstars)
        sigma = np.hypot(0.003, 0.005 * 10 ** (0.4 * (rng_true - 12))).astype(np.float32)

        def fill(f0, f1):
            rng = np.random.default_rng(f0)
            shape = (f1 - f0, nstars, nphot)
            mag = (
                rng_true[None, :, None] + rng.standard_normal(shape, dtype=np.float32) * sigma[None, :, None]
            )
            out = rng.random(shape, dtype=np.float32) < 0.02
            mag[out] += 1.5
            err = np.broadcast_to(sigma[None, :, None], shape).astype(np.float32)
            return mag.astype(np.float32), err

        t0 = time.perf_counter()
        store_from_arrays(
            store,
            np.arange(nstars, dtype=np.uint64) + 1,
            [f"f{i:06d}" for i in range(nframes)],
            n_photometries=nphot,
            dtype="f4",
            fill=fill,
        )
        print(
            f"wrote the {n_meas / 1e9:.2f} G-measurement store in {time.perf_counter() - t0:.0f} s ({store})"
        )
    params = MasterParameters()
    import dask

    rows = []
    for workers in (1, 2):
        with dask.config.set(scheduler="threads", num_workers=workers), PeakRSS(0.05) as rss:
            t0 = time.perf_counter()
            compute_statistics(store, params, block_bytes=block_mib * 2**20)
            elapsed = time.perf_counter() - t0
        rows.append([workers, f"{elapsed:.1f}", f"{n_meas / elapsed / 1e6:.1f}", f"{rss.peak_mib:.0f}"])
    print_table(
        rows,
        ["dask threads", "seconds", "M meas/s", "peak RSS MiB"],
        title=f"Out of core: {nframes} frames x {nstars} stars x {nphot} photometries, float32 "
        f"({n_meas / 1e9:.2f} G measurements of mag + the same of mag_err), block {block_mib} MiB",
    )
    print("target: under 180 s with peak RSS under 4096 MiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run of both parts")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--large-frames", type=int, default=2000)
    parser.add_argument("--large-stars", type=int, default=100_000)
    parser.add_argument("--large-photometries", type=int, default=5)
    parser.add_argument("--block-mib", type=int, default=DEFAULT_BLOCK_MIB)
    args = parser.parse_args(argv)
    print(f"machine: {machine_description()}\nload: {load_average()}")
    if args.quick:
        part_big(200, 300, 3, OUT / "quick", repeat=1)
        part_large(100, 3000, 2, OUT / "quick", block_mib=1)
        return
    part_big(1120, 896, 7, OUT)
    if not args.skip_large:
        part_large(args.large_frames, args.large_stars, args.large_photometries, OUT, args.block_mib)


if __name__ == "__main__":
    main()
