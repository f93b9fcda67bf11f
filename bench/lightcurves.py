"""Benchmark: light curves out of a store (``photref lightcurves``), time and memory.

What it measures, on this machine (printed at the top), on raw frames of ``--stars`` stars x 3
photometries after the magnitude-fitting loop:

1. ``write_light_curves`` in process, FITS and parquet, with small source blocks and with the default
   blocks, then the whole table in memory (``light_curves``): seconds, measurements a second, and the
   growth of the process's peak RSS (sampled) beside the size of the store's fitted magnitudes. Memory
   bounded means the blocked writes grow by about the block budget whatever the store's size, while the
   in-memory table grows with the store.
2. One file per star (FITS) for 2,000 of the stars, ms a star.
3. ``photref lightcurves`` as a process on Prefect's temporary server (what a user types), wall time.

Run: ``.venv/bin/python bench/lightcurves.py [--quick] [--frames N] [--stars S] [--skip-process]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import MIB, REPO, PeakRSS, load_average, machine_description, print_table  # noqa: E402
from photref_core.catalog import read_catalog  # noqa: E402
from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion  # noqa: E402
from photref_core.magfit import lightcurves as lc  # noqa: E402
from photref_core.magfit.loop import magnitude_fit  # noqa: E402
from photref_core.magfit.parameters import MagfitParameters  # noqa: E402
from photref_core.simulate.rawphotometry import simulate_raw_photometry  # noqa: E402

OUT = REPO / "bench-output" / "lightcurves"


def prepare(n_frames: int, n_stars: int, workdir: Path):
    """Simulated raw frames, ingested, the loop run (second-order terms: the loop is not measured here);
    kept from an earlier run of the same shape (``prepared.json``)."""
    marker = workdir / "prepared.json"
    shape = {"frames": n_frames, "stars": n_stars}
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return str(workdir / "field.zarr")
    shutil.rmtree(workdir, ignore_errors=True)
    sim = simulate_raw_photometry(workdir / "field", frames=n_frames, stars=n_stars, seed=5)
    store = str(workdir / "field.zarr")
    plan = plan_ingestion(store, sim.frames, catalog=read_catalog(sim.catalog))
    finalize_ingestion(store, [r for batch in plan.batches for r in ingest_batch(store, batch)])
    params = MagfitParameters(magfit_terms="O2{phot_g_mean_mag, x, y}")
    magnitude_fit(store, sim.catalog, workdir / "out" / "master.fits", params)
    marker.write_text(json.dumps(shape))
    return store


def measure(label: str, call, rows_table: list, data_mib: float) -> object:
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - t0
    rows = result["rows"] if isinstance(result, dict) else len(result)
    rows_table.append(
        [
            label,
            f"{seconds:.2f}",
            rows,
            f"{rows / seconds / 1e6:.2f}",
            f"{peak.growth_mib:.0f}",
            f"{data_mib:.0f}",
        ]
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--stars", type=int, default=5000)
    parser.add_argument(
        "--skip-process", action="store_true", help="leave out photref lightcurves as a process"
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine_description()}\nload: {load_average()}")
    n_frames, n_stars = (60, 1000) if args.quick else (args.frames, args.stars)
    workdir = OUT / ("quick" if args.quick else "full")
    t0 = time.perf_counter()
    store = prepare(n_frames, n_stars, workdir)
    print(
        f"prepared {n_frames} frames x {n_stars} stars (ingestion + loop) in {time.perf_counter() - t0:.1f} s"
    )
    source = lc.open_light_curves(store)
    data_mib = source.frame_slots.size * source.source_index.size * source.n_photometries * 8 / MIB
    small = 16 * MIB
    rows: list = []
    out = workdir / "lc"
    shutil.rmtree(out, ignore_errors=True)
    # Warm-up (imports, codecs, first allocations) so that the first measured write does not carry them.
    lc.write_light_curves(store, out / "warm.fits", sources=source.source_ids[:10], block_bytes=small)
    lc.write_light_curves(store, out / "warm.parquet", sources=source.source_ids[:10], block_bytes=small)
    measure(
        "FITS, 16 MiB blocks",
        lambda: lc.write_light_curves(store, out / "a.fits", block_bytes=small),
        rows,
        data_mib,
    )
    measure(
        "parquet, 16 MiB blocks",
        lambda: lc.write_light_curves(store, out / "a.parquet", block_bytes=small),
        rows,
        data_mib,
    )
    measure("FITS, default blocks", lambda: lc.write_light_curves(store, out / "b.fits"), rows, data_mib)
    measure("whole table in memory", lambda: lc.light_curves(store, block_bytes=2**40), rows, data_mib)
    print_table(
        rows,
        ["write", "seconds", "measurements", "M/s", "peak RSS growth MiB", "one (F, S, P) float64 array MiB"],
        title=f"\n1. light curves, {n_frames} frames x {n_stars} stars x {source.n_photometries} photom.",
    )

    t0 = time.perf_counter()
    some = source.source_ids[: min(2000, source.source_ids.size)]  # per-star cost: a sample of stars
    result = lc.write_light_curves(store, per_star=out / "stars", sources=some)
    seconds = time.perf_counter() - t0
    print_table(
        [
            [
                "FITS, one file per star",
                f"{seconds:.2f}",
                result["stars"],
                f"{1e3 * seconds / result['stars']:.2f}",
            ]
        ],
        ["write", "seconds", "stars", "ms a star"],
        title="\n2. per-star files",
    )

    if not (args.quick or args.skip_process):
        env = dict(
            os.environ, PREFECT_HOME=str(workdir / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
        )
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "flows.cli", "lightcurves", store, "--output", str(out / "c.fits")]
        t0 = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, timeout=1800)
        print_table(
            [["photref lightcurves as a process (temporary server)", f"{time.perf_counter() - t0:.2f}"]],
            ["command", "seconds"],
            title="\n3. as a user runs it",
        )


if __name__ == "__main__":
    main()
