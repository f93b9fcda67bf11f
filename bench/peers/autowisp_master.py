"""AutoWISP 2.3.0 builds its master photometric reference from photref's frame files; timed phase by phase.

Run with the python of AutoWISP's own environment (``bench/peers/autowisp_env.py`` makes it), never
photref's; ``-I`` keeps this script's directory (which holds the environment, ``autowisp/``) off
``sys.path``. It imports only the standard library, numpy, astropy and AutoWISP::

    bench/peers/autowisp/bin/python -I bench/peers/autowisp_master.py --frames 'field/frames/*.fits' \\
        --catalog field/catalog.fits --output out/ [--compare photref-master.fits]

It prints one JSON line of figures (seconds and counts; see the end of :func:`main`).

What of AutoWISP runs, all public API of ``autowisp.magnitude_fitting``:

* ``MasterPhotrefCollector(statistics_fname, num_photometries, num_frames, outlier_threshold=,
  max_rejection_iterations=, rejection_center=, rejection_units=, tempstore_dir=)``: the object AutoWISP's
  magnitude fitting feeds with every frame's fitted magnitudes and then asks for the master;
* ``add_input([(phot, fitted)])`` once per frame, as its magnitude fitting calls it: ``phot`` a structured
  array with ``source_id`` (uint64) and ``mag_err`` of shape (n, 1, P), ``fitted`` the magnitudes (n, P);
* ``generate_master(master_reference_fname=, catalog=, fit_terms_expression=, min_nobs_median_fraction=,
  fit_outlier_average=, fit_outlier_threshold=, fit_max_rej_iter=)``: the statistics with rejection (on a
  zarr 2 temporary store, rechunked), the scatter fit and the ``MPHOTREF`` tables;
* ``util.format_master_catalog`` (the catalog as its magnitude fitting shapes it) and
  ``util.get_master_photref``, which reads AutoWISP's master back, and photref's with ``--compare``.

What differs from photref's input, and why:

* photref's frames already hold the magnitudes a master is built from; they go to the collector as the
  "fitted" magnitudes, so the two tools do the same job: statistics, scatter fit, master.
* AutoWISP looks every collected star up in the catalog and raises ``KeyError`` for one that is not there;
  photref keeps such stars in its statistics and out of the master. Their rows are dropped here before
  ``add_input`` (about 3 % of the simulated stars: it only saves AutoWISP time).
* The collector drops a star from a frame when any of its values is not finite; the bench's frames have
  none, so both tools see the same values.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

import numpy as np
from astropy.io import fits
from astropy.table import Table

#: photref's rejection units by AutoWISP's names (AutoWISP has no ``absolute``).
UNITS_BY_PHOTREF_NAME = {"stddev": "meddev", "meddev": "medmeddev"}


def read_frame(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One photref frame file (SPEC 1.1): ``source_id`` (uint64), ``mag`` (n, P), ``mag_err`` (n, P)."""
    with fits.open(path, memmap=False) as hdul:
        table = next(h for h in hdul[1:] if isinstance(h, fits.BinTableHDU)).data
        ids = np.asarray(table["source_id"]).astype(np.uint64)
        mag = np.asarray(table["mag"], dtype=np.float64).reshape(len(ids), -1)
        err = np.asarray(table["mag_err"], dtype=np.float64).reshape(len(ids), -1)
    return ids, mag, err


def collector_input(ids: np.ndarray, mag: np.ndarray, err: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """A frame as the ``[(phot, fitted)]`` AutoWISP's magnitude fitting hands its collector."""
    phot = np.empty(len(ids), dtype=[("source_id", np.uint64), ("mag_err", np.float64, (1, mag.shape[1]))])
    phot["source_id"] = ids
    phot["mag_err"][:, 0, :] = err
    return [(phot, np.ascontiguousarray(mag))]


def compare_masters(ours: dict, theirs: dict) -> dict:
    """Stars in each master per photometry, and |difference| of the magnitudes of the stars in both."""
    n_phot = next(iter(ours.values()))["mag"].shape[1] if ours else 0
    per_phot = []
    for p in range(n_phot):
        a = {k: v["mag"][0, p] for k, v in ours.items() if np.isfinite(v["mag"][0, p])}
        b = {k: v["mag"][0, p] for k, v in theirs.items() if np.isfinite(v["mag"][0, p])}
        common = sorted(set(a) & set(b))
        diff = np.abs(np.array([a[k] - b[k] for k in common])) if common else np.array([np.nan])
        per_phot.append(
            {
                "photref": len(a),
                "autowisp": len(b),
                "both": len(common),
                "median_abs_diff": float(np.median(diff)),
                "max_abs_diff": float(np.max(diff)),
            }
        )
    return {"per_photometry": per_phot}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--frames", required=True, help="glob of photref frame FITS files (quoted)")
    parser.add_argument("--catalog", required=True, help="catalog FITS (source_id and the fit-terms columns)")
    parser.add_argument("--output", required=True, help="directory for AutoWISP's master and statistics")
    parser.add_argument("--compare", help="a photref master FITS to read with get_master_photref and compare")
    parser.add_argument("--fit-terms", required=True)
    parser.add_argument("--outlier-threshold", type=float, required=True)
    parser.add_argument("--max-rejection-iterations", type=int, required=True)
    parser.add_argument("--rejection-center", choices=["median", "mean"], required=True)
    parser.add_argument("--rejection-units", choices=sorted(UNITS_BY_PHOTREF_NAME), required=True)
    parser.add_argument("--min-nobs-median-fraction", type=float, required=True)
    parser.add_argument("--fit-outlier-average", choices=["median", "mean"], required=True)
    parser.add_argument("--fit-outlier-threshold", type=float, required=True)
    parser.add_argument("--fit-max-rej-iter", type=int, required=True)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    from autowisp.magnitude_fitting import MasterPhotrefCollector
    from autowisp.magnitude_fitting.util import format_master_catalog, get_master_photref

    import_s = time.perf_counter() - start

    paths = sorted(glob.glob(args.frames))
    if not paths:
        parser.error(f"no frame matches {args.frames!r}")
    out = os.path.abspath(args.output)
    shutil.rmtree(out, ignore_errors=True)
    tempstore = os.path.join(out, "tempstore")
    os.makedirs(tempstore)
    master = os.path.join(out, "autowisp-master.fits")

    start = time.perf_counter()
    catalog_table = Table.read(args.catalog)
    catalog_ids = np.asarray(catalog_table["source_id"]).astype(np.uint64)
    catalog = format_master_catalog(catalog_table.to_pandas())
    n_phot = read_frame(paths[0])[1].shape[1]
    catalog_s = time.perf_counter() - start

    collector = MasterPhotrefCollector(
        os.path.join(out, "statistics.txt"),
        n_phot,
        len(paths),
        outlier_threshold=args.outlier_threshold,
        max_rejection_iterations=args.max_rejection_iterations,
        rejection_center=args.rejection_center,
        rejection_units=UNITS_BY_PHOTREF_NAME[args.rejection_units],
        tempstore_dir=tempstore,
    )
    read_s = add_s = 0.0
    dropped = 0
    for path in paths:
        start = time.perf_counter()
        ids, mag, err = read_frame(path)
        known = np.isin(ids, catalog_ids)
        dropped += int((~known).sum())
        frame = collector_input(ids[known], mag[known], err[known])
        read_s += time.perf_counter() - start
        start = time.perf_counter()
        collector.add_input(frame)
        add_s += time.perf_counter() - start

    start = time.perf_counter()
    collector.generate_master(
        master_reference_fname=master,
        catalog=catalog,
        fit_terms_expression=args.fit_terms,
        min_nobs_median_fraction=args.min_nobs_median_fraction,
        fit_outlier_average=args.fit_outlier_average,
        fit_outlier_threshold=args.fit_outlier_threshold,
        fit_max_rej_iter=args.fit_max_rej_iter,
    )
    generate_s = time.perf_counter() - start
    shutil.rmtree(tempstore, ignore_errors=True)

    theirs = get_master_photref(master)
    figures = {
        "import_s": round(import_s, 3),
        "catalog_s": round(catalog_s, 3),
        "read_s": round(read_s, 3),
        "add_input_s": round(add_s, 3),
        "generate_master_s": round(generate_s, 3),
        "frames": len(paths),
        "photometries": int(n_phot),
        "rows_not_in_catalog": dropped,
        "master": master,
        "master_stars": len(theirs),
    }
    if args.compare:
        # photref's master read by AutoWISP's own reader: a KeyError or a bad HDU would fail here.
        ours = get_master_photref(args.compare)
        figures["photref_master_stars"] = len(ours)
        figures["comparison"] = compare_masters(ours, theirs)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
