"""psfmachine 1.1.4 on a field of FITS frames, timed phase by phase: the peer side of ``bench/prf.py``.

Run with the python of psfmachine's own environment (``bench/peers/psfmachine_env.py`` makes it), never
photref's: it imports neither photref nor anything of the bench. Written from psfmachine's public API
(``Machine(time, flux, flux_err, ra, dec, sources, column, row, ...)``, ``build_shape_model()``,
``fit_model()``; with ``--time-model`` also ``build_time_model()`` and ``fit_model(fit_va=True)``, the
``Machine`` given ``time_nknots``, ``time_resolution`` and ``time_radius``); no psfmachine code is copied.

What a user of ``Machine`` does with such frames: every frame's pixels flattened, the pixels that are bad
in any frame left out (``Machine`` has no per-frame mask), each pixel's sky position from the first frame's
WCS (the frames share one), the catalog as a pandas DataFrame. Prints one JSON line: the seconds of each
phase and where the fluxes went (``--output``: an ``.npz`` with ``flux`` and ``flux_err``, frames x
sources in the catalog's order, ``source_id`` and ``frame_id``; with ``--time-model`` also ``flux_time`` and
``flux_err_time``, the fit with the time model).
"""

from __future__ import annotations

import argparse
import glob
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", required=True, help="glob of the FITS frames (data, ERR and MASK HDUs)")
    ap.add_argument("--catalog", required=True, help="FITS table: source_id, ra, dec, flux")
    ap.add_argument("--output", required=True, help="the .npz of fluxes")
    for name in ("rmin", "rmax", "cut_r", "sparse_dist_lim"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, required=True, help="arcsec")
    ap.add_argument("--n-r-knots", type=int, default=10)
    ap.add_argument("--n-phi-knots", type=int, default=15)
    ap.add_argument("--flux-cut-off", type=float, default=1.0)
    ap.add_argument("--upper-radius-limit", type=float, default=28.0, help="arcsec (source mask)")
    ap.add_argument("--lower-radius-limit", type=float, default=4.5, help="arcsec (source mask)")
    ap.add_argument("--time-model", action="store_true", help="build_time_model() + fit_model(fit_va=True)")
    ap.add_argument("--time-nknots", type=int, default=None, help="Machine's time_nknots (default: its own)")
    ap.add_argument("--time-resolution", type=int, default=None, help="Machine's time_resolution")
    ap.add_argument("--time-radius", type=float, default=None, help="Machine's time_radius, arcsec")
    args = ap.parse_args()
    time_options = {
        k: getattr(args, k)
        for k in ("time_nknots", "time_resolution", "time_radius")
        if getattr(args, k) is not None
    }

    seconds = {}
    start = time.perf_counter()
    import numpy as np
    import pandas as pd
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS
    from psfmachine.machine import Machine

    seconds["import"] = time.perf_counter() - start

    start = time.perf_counter()
    paths = sorted(glob.glob(args.frames))
    flux, err, bad, times, frame_ids = [], [], None, [], []
    for path in paths:
        with fits.open(path) as hdul:
            header = hdul[0].header
            flux.append(np.asarray(hdul[0].data, dtype=float).ravel())
            err.append(np.asarray(hdul["ERR"].data, dtype=float).ravel())
            mask = np.asarray(hdul["MASK"].data).ravel() != 0
            bad = mask if bad is None else bad | mask
            times.append(float(header["JD"]))
            frame_ids.append(str(header["FRAMEID"]))
            if len(flux) == 1:
                wcs, shape = WCS(header), hdul[0].data.shape
    flux, err = np.array(flux), np.array(err)
    good = ~bad & np.isfinite(flux).all(axis=0) & np.isfinite(err).all(axis=0) & (err > 0).all(axis=0)
    row, column = np.mgrid[0 : shape[0], 0 : shape[1]]
    row, column = row.ravel()[good].astype(float), column.ravel()[good].astype(float)
    ra, dec = wcs.all_pix2world(column, row, 0)
    catalog = Table.read(args.catalog)
    sources = pd.DataFrame(
        {
            "ra": np.asarray(catalog["ra"], float),
            "dec": np.asarray(catalog["dec"], float),
            "flux": np.asarray(catalog["flux"], float),
        }
    )
    seconds["read"] = time.perf_counter() - start

    start = time.perf_counter()
    machine = Machine(
        np.array(times),
        flux[:, good],
        err[:, good],
        ra,
        dec,
        sources,
        column,
        row,
        n_r_knots=args.n_r_knots,
        n_phi_knots=args.n_phi_knots,
        rmin=args.rmin,
        rmax=args.rmax,
        cut_r=args.cut_r,
        sparse_dist_lim=args.sparse_dist_lim,
        sources_flux_column="flux",
        **time_options,
    )
    machine.quiet = True
    seconds["init"] = time.perf_counter() - start
    start = time.perf_counter()
    machine.build_shape_model(
        plot=False,
        flux_cut_off=args.flux_cut_off,
        upper_radius_limit=args.upper_radius_limit,
        lower_radius_limit=args.lower_radius_limit,
    )
    seconds["shape model"] = time.perf_counter() - start
    if args.time_model:
        start = time.perf_counter()
        machine.build_time_model(plot=False)
        seconds["time model"] = time.perf_counter() - start
    start = time.perf_counter()
    machine.fit_model(fit_va=args.time_model)
    seconds["fit"] = time.perf_counter() - start

    extra = {}
    if args.time_model:
        extra = {
            "flux_time": np.asarray(machine.ws_va, float),
            "flux_err_time": np.asarray(machine.werrs_va, float),
        }
    np.savez(
        args.output,
        **extra,
        flux=np.asarray(machine.ws, float),
        flux_err=np.asarray(machine.werrs, float),
        source_id=np.asarray(catalog["source_id"]).astype(np.int64),
        frame_id=np.array(frame_ids),
    )
    print(
        json.dumps(
            {
                "seconds": seconds,
                "n_frames": len(paths),
                "n_sources": len(catalog),
                "n_pixels": int(good.sum()),
                "output": args.output,
            }
        )
    )


if __name__ == "__main__":
    main()
