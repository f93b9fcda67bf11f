"""``photref demo DIR``: simulate a small field and run the whole pipeline on it.

Leaves in DIR: the simulated inputs (``photometry/``, ``images/``, ``raw/``), the store (``field.zarr``), the
master FITS (``master.fits``), its statistics table (``master_stat.fits``), the plots (``master_*.png``), the
PRF fluxes (``prf_fluxes.fits``), shape-model plot (``prf_fluxes_prf.png``) and chi image
(``prf_fluxes_chi.png``), the magnitude fitting of the
raw frames (store ``raw.zarr``, ``magfit/master.fits``, ``magfit/master_iter<k>.fits``,
``magfit/master_magfit.json``), their light curves (``magfit/lightcurves.fits``), and ``summary.md``.
Without a ``PREFECT_API_URL`` the flows run on Prefect's temporary embedded server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_demo(directory, frames: int = 60, stars: int = 400, photometries: int = 3, seed: int = 1) -> dict:
    """Simulate a field, ingest it and build its master, then a small PRF run and the magnitude fitting of
    raw frames; returns what was written."""
    from photref_core.prf.parameters import PRFParameters
    from photref_core.simulate.images import simulate_images
    from photref_core.simulate.photometry import simulate_photometry
    from photref_core.simulate.rawphotometry import simulate_raw_photometry

    from .lightcurves import run_lightcurves
    from .magfit import run_magfit
    from .master_photref import run_master
    from .prf import run_prf

    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = simulate_photometry(
        out / "photometry", frames=frames, stars=stars, photometries=photometries, seed=seed
    )
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The glob, as a user passes it: one parameter in the UI, not 60 expanded paths.
    frames_glob = str(Path(sim.frames[0]).parent / "*.fits")
    products = run_master(out / "field.zarr", sim.catalog, out / "master.fits", frames=[frames_glob])
    t_master = time.perf_counter() - t0
    # A small PRF field (0.11"/pix, dec 70, 40 stars with crowded pairs and variables) with SPEC's radii: with
    # rmax 1.1" (10 px) the simulated PRF's wing shows as rings around the bright stars in the chi image.
    t0 = time.perf_counter()
    images = simulate_images(out / "images", n_frames=12, n_stars=40, size=200, min_separation=24, seed=seed)
    prf = run_prf(
        out / "field.zarr",
        [str(Path(images["paths"][0]).parent / "*.fits")],
        images["catalog"],
        out / "prf_fluxes.fits",
        params=PRFParameters(),
    )
    t_prf = time.perf_counter() - t0
    # Raw frames (zero points, x/y patterns; not yet magnitude-fitted) through AutoWISP's loop.
    t0 = time.perf_counter()
    raw = simulate_raw_photometry(out / "raw", frames=frames, stars=1000, seed=seed)
    (out / "magfit").mkdir(exist_ok=True)
    magfit = run_magfit(
        out / "raw.zarr",
        raw.catalog,
        out / "magfit" / "master.fits",
        frames=[str(Path(raw.frames[0]).parent / "*.fits")],
    )
    curves = run_lightcurves(out / "raw.zarr", out / "magfit" / "lightcurves.fits")
    t_magfit = time.perf_counter() - t0
    summary = {
        "inputs": {
            "frames": len(sim.frames),
            "stars": stars,
            "photometries": photometries,
            "catalog": str(sim.catalog),
            "truth": str(sim.truth),
        },
        "store": str(out / "field.zarr"),
        "master": products,
        "prf": prf,
        "magfit": magfit,
        "lightcurves": curves,
        "seconds": {
            "simulate": round(t_sim, 2),
            "ingest+master flow": round(t_master, 2),
            "simulate images + prf flow": round(t_prf, 2),
            "simulate raw frames + magfit flow + light curves": round(t_magfit, 2),
        },
    }
    lines = [
        "# photref demo",
        "",
        f"Simulated {len(sim.frames)} frames x {stars} stars x {photometries} photometries in "
        f"`{out / 'photometry'}`, ingested into `{out / 'field.zarr'}`.",
        "",
        f"* master: `{products['master']}` ({products['frames_included']} frames included)",
        f"* statistics table: `{products['statistics']}`",
        *[f"* plot: `{p}`" for p in products["plots"]],
        "",
        "| photometry | stars in master | in fit | rejected by fit | fit rms (dex) |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {r['photometry']} | {r['stars_in_master']} | {r['stars_in_fit']} | "
            f"{r['stars_rejected_by_fit']} | {r['fit_rms_dex']:.4f} |"
            for r in products["photometries"]
        ],
    ]
    lines += [
        "",
        f"PRF photometry of {prf['n_frames']} simulated images x {prf['n_sources']} sources: "
        f"fluxes in `{prf['fluxes']}`, shape model plot `{prf['plot']}`, chi image `{prf['chi_plot']}` "
        f"(median PRF fraction on the frame {prf['median_source_psf_fraction']:.4f}; reference frame "
        f"chi^2/dof over source pixels {prf['residuals']['chi2_per_dof']:.3g}, robust "
        f"{prf['residuals']['robust_chi2_per_dof']:.3g}).",
        "",
        f"Magnitude fitting of {len(raw.frames)} raw frames x 1000 stars (`{out / 'raw.zarr'}`): "
        f"{len(magfit['iterations'])} iterations, {magfit['stopped']}; final master "
        f"`{magfit['master']['master']}`, fitted magnitudes in the store group `{magfit['final_group']}`; "
        f"light curves ({curves['rows']} measurements of {curves['stars']} stars) in `{curves['output']}`.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _cmd_demo(args) -> int:
    summary = run_demo(args.directory, frames=args.frames, stars=args.stars, seed=args.seed)
    print(Path(args.directory, "summary.md").read_text())
    took = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in summary["seconds"].items())
    print(f"Took: {took}.")
    return 0


def add_subcommand(sub) -> None:
    """Register ``photref demo`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="simulate a small field and run the whole pipeline")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--stars", type=int, default=400)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_cmd_demo)
