"""PRF accuracy against known truth, as a user runs it (``photref prf`` as a process), and the shape-model
build time.

Fields: ``photref_core.simulate.fields`` -- Roman-like (0.11"/pix, FWHM 2.2 px, 300 stars on 256x256),
Kepler-like (4"/pix, FWHM 1.5 px, 200 stars on 128x128) and TESS-like (21"/pix, FWHM 1.2 px, 200 stars on
128x128); an asymmetric non-Gaussian PRF (elliptical Moffat core, offset 6 % wing), WCS rotated 15 deg at
dec +60, 15 % of the stars in close pairs, catalog fluxes with 10 % scatter; SPEC radii x pixscale/0.11
(and 16 radial knots at 21"/pix, see ``FIELD_PRF_OPTIONS``). Two random fields per sampling.

For each field, three fits of the same frames:

* **before**: ``photref prf ... --refine-iterations 0`` (the selection-based shape fit alone);
* **after**: ``photref prf ...`` (with the joint all-pixel refinement, the default);
* **oracle**: the true PRF at the true positions (in this process, ``fields.oracle_fit``).

Each ``photref prf`` runs as its own process on Prefect's temporary server (no server running), like a
user's first command; its wall time is printed. The scores (``fields.score_fluxes``): median |flux/true - 1|
of isolated stars, the flux scale, chi std of isolated stars and of pair members, the 90th percentile of
the per-star bias (sigma), and the bright-minus-faint bias.

Then the shape-model build (``PRFModel.build`` in this process, 20 frames, Kepler-like density) at 128x128
and 512x512, split into the selection-based fit and the refinement, with the peak RSS.

Run: ``.venv/bin/python bench/prf_accuracy.py`` (about 10 minutes; ``--quick``: one field per sampling,
no 512x512 build).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, PeakRSS, load_average, machine_description, print_table  # noqa: E402

FIELD_CASES = [("roman", 1), ("roman", 2), ("kepler", 1), ("kepler", 2), ("tess", 1), ("tess", 2)]
METRICS = [
    ("isolated_median_abs_rel_err", "med |rel|", "{:.2%}"),
    ("flux_scale", "scale", "{:.4f}"),
    ("isolated_chi_std", "chi iso", "{:.2f}"),
    ("blends_chi_std", "chi blends", "{:.2f}"),
    ("p90_star_bias_sigma", "p90 bias", "{:.2f}"),
    ("bright_minus_faint_bias", "bright-faint", "{:+.2%}"),
]


def cli_env(workdir: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(workdir / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_API_URL="",
    )
    return env


def run_cli(sim, workdir: Path, tag: str, extra: list[str]) -> tuple[Path, float]:
    """``photref prf`` on the field's frames as a process; returns the output table and the wall time."""
    params = sim["prf_params"]
    out = workdir / f"{tag}.fits"
    cmd = [
        str(REPO / ".venv" / "bin" / "photref"),
        "prf",
        str(workdir / f"{tag}.zarr"),
        str(Path(sim["paths"][0]).parent / "*.fits"),
        "--catalog",
        sim["catalog"],
        "--output",
        str(out),
        "--no-plot",
        *[f"--{k.replace('_', '-')}={v}" for k, v in params.items()],
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=cli_env(workdir), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"photref prf failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out, wall


def read_fluxes(path, frame_ids, source_ids):
    """The long-format output table as (frames, sources) flux and error arrays."""
    from astropy.table import Table

    t = Table.read(path, hdu="FLUXES")
    fi = {f: i for i, f in enumerate(frame_ids)}
    si = {int(s): i for i, s in enumerate(source_ids)}
    flux = np.full((len(frame_ids), len(source_ids)), np.nan)
    err = np.full_like(flux, np.nan)
    rows = np.array([fi[str(f)] for f in t["frame_id"]])
    cols = np.array([si[int(s)] for s in t["source_id"]])
    flux[rows, cols] = np.where(t["flag"] == 0, t["flux"], np.nan)
    err[rows, cols] = np.where(t["flag"] == 0, t["flux_err"], np.nan)
    return flux, err


def accuracy(quick: bool, n_frames: int, root: Path):
    from astropy.table import Table

    from photref_core.simulate.fields import (
        load_frames,
        oracle_fit,
        score_fluxes,
        simulate_field,
        true_fluxes,
    )

    cases = [c for c in FIELD_CASES if c[1] == 1] if quick else FIELD_CASES
    rows = []
    for name, seed in cases:
        work = root / f"{name}{seed}"
        sim = simulate_field(work / "field", name, seed=seed, n_frames=n_frames)
        truth = Table.read(sim["truth"])
        cat = Table.read(sim["catalog"])
        ns = len(cat)
        frame_ids = [str(f) for f in truth["frame_id"][::ns]]
        pair, edge = np.asarray(truth["pair_id"][:ns]), np.asarray(truth["edge"][:ns])
        true_rmax = true_fluxes(sim, sim["prf_params"]["rmax"])
        scores = {}
        for tag, extra in (("before", ["--refine-iterations=0"]), ("after", [])):
            out, wall = run_cli(sim, work, tag, extra)
            f, e = read_fluxes(out, frame_ids, cat["source_id"])
            scores[tag] = (score_fluxes(f, e, true_rmax, pair, edge), wall)
        flux, err, mask, _ = load_frames(sim["paths"])
        of, oe = oracle_fit(sim, flux, err, mask)
        scores["oracle"] = (score_fluxes(of, oe, true_fluxes(sim), pair, edge), float("nan"))
        for tag in ("before", "after", "oracle"):
            s, wall = scores[tag]
            rows.append(
                [f"{name} {seed}", tag]
                + [fmt.format(s[k]) for k, _, fmt in METRICS]
                + ["" if np.isnan(wall) else f"{wall:.1f}"]
            )
        print(f"  {name} {seed} done", flush=True)
    print_table(
        rows,
        ["field", "fit"] + [h for _, h, _ in METRICS] + ["photref prf (s)"],
        title=f"PRF accuracy, {n_frames} frames a field (isolated: not in a pair, not on the edge)",
    )


def build_times(sizes, root: Path):
    from astropy.table import Table

    from photref_core.prf.model import PRFModel
    from photref_core.prf.parameters import PRFParameters
    from photref_core.simulate.fields import load_frames, simulate_field

    rows = []
    for size in sizes:
        ns = int(round(200 * (size / 128) ** 2))
        sim = simulate_field(root / f"build{size}", "kepler", seed=7, n_frames=20, size=size, n_stars=ns)
        flux, err, mask, wcs = load_frames(sim["paths"])
        cat = Table.read(sim["catalog"])
        times = {}
        for label, kw in (("selection only", dict(refine_iterations=0)), ("with refinement", {})):
            params = PRFParameters(**sim["prf_params"], **kw)
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                model = PRFModel.from_catalog(flux, err, wcs[0], cat, params=params, mask=mask)
                times[label] = time.perf_counter() - t0
            d = model.diagnostics
            rows.append(
                [
                    f"{size}x{size}",
                    ns,
                    label,
                    f"{times[label]:.1f}",
                    d.get("refine_iterations", ""),
                    f"{d['refine_chi2'][-1]:.3f}" if "refine_chi2" in d else "",
                    f"{rss.peak_mib - rss.start_mib:.0f}",
                ]
            )
        print(f"  build {size} done", flush=True)
    print_table(
        rows,
        ["frame", "sources", "shape model", "build (s)", "iterations", "chi2/pixel", "peak RSS growth (MiB)"],
        title='Shape-model build (PRFModel.build, 20 frames, Kepler-like: 4"/pix, FWHM 1.5 px)',
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one field per sampling, no 512x512 build")
    ap.add_argument("--frames", type=int, default=20, help="frames a field")
    args = ap.parse_args(argv)
    print(machine_description())
    print("load average:", load_average())
    root = REPO / "bench-output" / "prf_accuracy"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        accuracy(args.quick, args.frames, Path(tmp))
        build_times([128] if args.quick else [128, 512], Path(tmp))
    print("load average:", load_average())


if __name__ == "__main__":
    main()
