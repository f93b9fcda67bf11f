"""Benchmark: PRF fluxes on real pixels, the Kepler FFI cutout, ``photref prf`` beside psfmachine 1.1.4.

Both tools get the same frame and catalog (``bench/kepler_field.py``: collateral, saturated and bleed pixels
masked, background subtracted, 423 stars found by photutils' DAOStarFinder). Each one's fluxes are checked
the same way: the median, over isolated bright stars, of fitted flux / 3-pixel aperture flux corrected to
5 pixels on the data (``kepler_field.aperture_check``; ~1.02 expected of a total-flux fit).

(a) ``photref prf`` as a process (temporary server), SPEC 6's radii scaled to 4"/pix, with
    ``--model-output``: its seconds, the check, the reference frame's chi^2/dof over source pixels.
(b) psfmachine 1.1.4 (``bench/peers/psfmachine_fit.py`` in its own environment, made on first use): with
    its own Kepler defaults (rmin 1", rmax 16", cut_r 6", sparse_dist_lim 40": what its FFI machine uses)
    and with photref's radii. Its seconds and the check.

~1 minute here, plus psfmachine's environment once (``--no-psfmachine``: photref only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from astropy.table import Table

try:
    import bench  # noqa: F401
except (
    ModuleNotFoundError
):  # run as ``python bench/prf_kepler.py``: bench/ is on sys.path, not the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import PHOTREF, photref_env, timed_process
from bench.kepler_field import KEPLER_PIXSCALE, aperture_check, prepare_kepler_field
from bench.prf import PSFMACHINE_DEFAULTS, radius_options, run_psfmachine
from photref_core.simulate.fields import spec_radii

REPO = Path(__file__).resolve().parent.parent


def photref_run(field: dict, work: Path) -> dict:
    """``photref prf`` on the frame, as a process on a temporary server; its seconds, fluxes and figures."""
    env = photref_env(work / "prefect")
    output, models = work / "photref-fluxes.fits", work / "photref-model.fits"
    args = [PHOTREF, "prf", str(work / "photref.zarr"), field["image"], "--catalog", field["catalog"]]
    args += ["--output", str(output), "--model-output", str(models), "--json"]
    args += radius_options(spec_radii(KEPLER_PIXSCALE))
    seconds, out = timed_process(args, env, work / "photref.log")
    products = json.loads(out)
    fluxes = Table.read(output, hdu="FLUXES")
    return {
        "process_s": seconds,
        "fluxes": fluxes,
        "residuals": products["residuals"],
        "chi_plot": products.get("chi_plot"),
        "model_images": products.get("model_images"),
    }


def psfmachine_run(field: dict, work: Path, label: str, radii: dict) -> dict:
    """psfmachine 1.1.4 on the frame with ``radii``; its seconds and fluxes (frame 0)."""
    output = work / f"psfmachine-{label}.npz"
    seconds, result = run_psfmachine(field["image"], field["catalog"], radii, output, work)
    with np.load(output) as z:
        fluxes = Table({"source_id": z["source_id"], "flux": np.asarray(z["flux"], float)[0]})
    return {"process_s": seconds, "fluxes": fluxes, "phases": result["seconds"]}


def figures(field: dict, run: dict) -> dict:
    """The aperture check and the NaN count of one run's fluxes."""
    check = aperture_check(field["image"], field["catalog"], run["fluxes"])
    nan = np.asarray(run["fluxes"]["source_id"])[~np.isfinite(np.asarray(run["fluxes"]["flux"], float))]
    return {
        "median_ratio": check["median_ratio"],
        "ratio_p16_p84": [float(np.percentile(check["ratios"], q)) for q in (16, 84)],
        "n_stars": check["n_stars"],
        "aperture_correction": check["aperture_correction"],
        "nan_sources": nan.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-psfmachine", dest="peer", action="store_false", help="photref only")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-output" / "prf-kepler")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    field = prepare_kepler_field(work / "field")
    print(
        f"Kepler FFI cutout: {field['n_sources']} sources found, saturated: {field['saturated']}, "
        f"background {field['background']:.1f} e-/s subtracted",
        flush=True,
    )
    runs = {"photref": photref_run(field, work)}
    if args.peer:
        runs["psfmachine (its Kepler defaults)"] = psfmachine_run(
            field, work, "defaults", PSFMACHINE_DEFAULTS
        )
        runs["psfmachine (photref's radii)"] = psfmachine_run(
            field, work, "photref-radii", spec_radii(KEPLER_PIXSCALE)
        )
    results = {}
    print(f"\n{'tool':34s} {'s':>6s} {'fit/aperture':>13s} {'16-84 %':>13s} {'stars':>6s}  NaN (source ids)")
    for name, run in runs.items():
        fig = figures(field, run) | {"process_s": run["process_s"]}
        results[name] = fig
        lo, hi = fig["ratio_p16_p84"]
        print(
            f"{name:34s} {run['process_s']:6.1f} {fig['median_ratio']:13.4f} {lo:6.3f}-{hi:6.3f} "
            f"{fig['n_stars']:6d}  {fig['nan_sources']}"
        )
    photref = runs["photref"]
    results["photref"]["residuals"] = photref["residuals"]
    res = photref["residuals"]
    print(
        f"\nphotref's reference frame: chi^2/dof over {res['source_pixels']} source pixels "
        f"{res['chi2_per_dof']:.4g} (robust {res['robust_chi2_per_dof']:.4g}); "
        f"chi image {photref['chi_plot']}; "
        f"model and residual images {photref['model_images']}"
    )
    print(f"aperture correction 3 -> 5 pixels (on the data): {results['photref']['aperture_correction']:.4f}")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
