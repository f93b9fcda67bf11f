"""``photref demo DIR``: simulate a small field and run the whole pipeline on it.

Leaves in DIR: the simulated inputs (``photometry/``), the store (``field.zarr``), the master FITS
(``master.fits``), its statistics table (``master_stat.fits``), the plots (``master_*.png``) and a
``summary.md``. Without a ``PREFECT_API_URL`` the flows run on Prefect's temporary embedded server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_demo(directory, frames: int = 60, stars: int = 400, photometries: int = 3, seed: int = 1) -> dict:
    """Simulate a field, ingest it and build its master; returns what was written."""
    from photref_core.simulate import simulate_photometry

    from .master_photref import run_master

    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = simulate_photometry(
        out / "photometry", frames=frames, stars=stars, photometries=photometries, seed=seed
    )
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    products = run_master(
        out / "field.zarr", sim.catalog, out / "master.fits", frames=[str(p) for p in sim.frames]
    )
    t_master = time.perf_counter() - t0
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
        "seconds": {"simulate": round(t_sim, 2), "ingest+master flow": round(t_master, 2)},
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
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _cmd_demo(args) -> int:
    summary = run_demo(args.directory, frames=args.frames, stars=args.stars, seed=args.seed)
    print(Path(args.directory, "summary.md").read_text())
    print(f"(took {summary['seconds']})")
    return 0


def add_subcommand(sub) -> None:
    """Register ``photref demo`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="simulate a small field and run the whole pipeline")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--stars", type=int, default=400)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_cmd_demo)
