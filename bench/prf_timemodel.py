"""The PRF time model, part 1, against known truth under drift, as a user runs it (``photref prf``).

Fields (``photref_core.simulate.fields``, SPEC radii scaled by pixscale / 0.11): Roman-like (0.11"/pix,
FWHM 2.2 px, 300 stars on 256x256) and Kepler-like (4"/pix, FWHM 1.5 px, 200 stars on 128x128), 40 frames
each. Each field twice: with a drift not in the WCS (0.5 px over the campaign, quadratic in time, plus a
plate-scale change that moves the frame edge by 0.25 px) and without.

For each field:

* ``photref prf`` without the time model (a process on Prefect's temporary server): its wall time;
* ``photref prf --time-model`` (a process, a new store): its wall time, the time model's fluxes, then the
  same command with ``--output-fluxes static`` (cached: the static fluxes of the same run);
* the oracle: the true PRF at the true positions (this process, ``fields.oracle_fit``).

Scores: the isolated stars' time scatter (median over stars of the std over frames of fitted / true) over
the oracle's, the chi std of isolated stars and of pair members, the median |relative error| of the variable
stars, and the rms error of the recovered transforms (mpix, up to the constant of the model's centre). Then
the cost of a frame's fit in this process (``PRFModel.fit`` with and without the time model, one BLAS
thread) and of the time model's build.

Run: ``.venv/bin/python bench/prf_timemodel.py`` (about 10 minutes; ``--quick``: the Kepler-like field
with 20 frames).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, machine_description, print_table  # noqa: E402
from prf_accuracy import read_fluxes, run_cli  # noqa: E402

FIELDS = {"roman": 256, "kepler": 128}


def read_transforms(path, frame_ids):
    """The FRAMES HDU of a time-model output: (frames, terms) in ``frame_ids`` order."""
    from astropy.table import Table

    t = Table.read(path, hdu="FRAMES")
    terms = [c for c in t.colnames if c not in ("frame_id", "time")]
    by_id = {str(f): k for k, f in enumerate(t["frame_id"])}
    return np.array([[t[c][by_id[f]] for c in terms] for f in frame_ids])


def run_field(name, drifting, n_frames, root):
    from astropy.io import fits
    from astropy.table import Table

    from photref_core.prf.steps import load_prf_model
    from photref_core.prf.timemodel import source_shifts
    from photref_core.simulate.fields import (
        load_frames,
        oracle_fit,
        score_fluxes,
        simulate_field,
        time_scatter,
        transform_error,
        true_fluxes,
    )

    size = FIELDS[name]
    drift = dict(drift=0.5, scale_drift=0.25 / (size / 2)) if drifting else {}
    work = root / f"{name}{'-drift' if drifting else ''}"
    sim = simulate_field(work / "field", name, seed=1, n_frames=n_frames, **drift)
    truth = Table.read(sim["truth"])
    cat = Table.read(sim["catalog"])
    ns = len(cat)
    frame_ids = [str(f) for f in truth["frame_id"][::ns]]
    pair, edge = np.asarray(truth["pair_id"][:ns]), np.asarray(truth["edge"][:ns])
    variable = np.asarray(truth["variable"][:ns], bool)
    true_rmax = true_fluxes(sim, sim["prf_params"]["rmax"])
    flux, err, mask, wcs = load_frames(sim["paths"])
    of, oe = oracle_fit(sim, flux, err, mask)
    oracle_scatter = time_scatter(of, true_fluxes(sim), pair, edge)

    _, wall_plain = run_cli(sim, work, "plain", [])
    out_time, wall_time = run_cli(sim, work, "time", ["--time-model"])
    fits_time = read_fluxes(out_time, frame_ids, cat["source_id"])
    transforms = read_transforms(out_time, frame_ids)
    out_static, _ = run_cli(sim, work, "time", ["--time-model", "--output-fluxes=static"])
    fits_static = read_fluxes(out_static, frame_ids, cat["source_id"])

    # The command's model, from its store; the transforms as every source's shift on the first frame's
    # geometry (one WCS for all frames).
    model = load_prf_model(str(work / "time.zarr"), fits.getheader(out_time)["PRFMODEL"])
    g = model.frames.geometry(wcs[0])
    shifts = np.array([source_shifts(model.params.transform, g, a) for a in transforms])
    rms_mpix = 1e3 * float(np.sqrt(np.mean(np.sum(transform_error(sim, shifts) ** 2, axis=1))))

    rows = []
    label = f"{name}, {'0.5 px drift' if drifting else 'no drift'}"
    for tag, (f, e), wall in (
        ("static", fits_static, wall_plain),
        ("time model", fits_time, wall_time),
        ("oracle", (of, oe), float("nan")),
    ):
        true = true_fluxes(sim) if tag == "oracle" else true_rmax
        s = score_fluxes(f, e, true, pair, edge)
        var_err = float(np.nanmedian(np.abs(f / true - 1)[:, variable])) if variable.any() else float("nan")
        scatter = time_scatter(f, true, pair, edge) / oracle_scatter
        rows.append(
            [
                label,
                tag,
                f"{scatter:.3f}x",
                f"{s['isolated_chi_std']:.2f}",
                f"{s['blends_chi_std']:.2f}",
                f"{var_err:.2%}",
                f"{rms_mpix:.2f}" if tag == "time model" else "",
                "" if np.isnan(wall) else f"{wall:.1f}",
            ]
        )
    cost = fit_cost(model, flux, err, mask, wcs)
    return rows, cost, sim


def fit_cost(model, flux, err, mask, wcs):
    """Seconds a frame: the fit with and without the time model, in this process (one BLAS thread)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        t0 = time.perf_counter()
        model.fit(flux, err, mask, wcs, time_model=False)
        static = (time.perf_counter() - t0) / flux.shape[0]
        t0 = time.perf_counter()
        model.fit(flux, err, mask, wcs)
        moving = (time.perf_counter() - t0) / flux.shape[0]
    return static, moving


def build_cost(sim):
    """Seconds: the shape model's build without and with the time model (this process)."""
    from astropy.table import Table

    from photref_core.prf.model import PRFModel
    from photref_core.prf.parameters import PRFParameters
    from photref_core.simulate.fields import load_frames

    flux, err, mask, wcs = load_frames(sim["paths"])
    cat = Table.read(sim["catalog"])
    out = []
    for on in (False, True):
        params = PRFParameters(**sim["prf_params"], time_model=on)
        t0 = time.perf_counter()
        PRFModel.build(flux, err, wcs, cat["ra"], cat["dec"], cat["flux"], params=params, mask=mask)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the Kepler-like field, 20 frames")
    args = ap.parse_args(argv)
    print(machine_description())
    print("load average:", load_average())
    n_frames = 20 if args.quick else 40
    names = ["kepler"] if args.quick else ["roman", "kepler"]
    root = REPO / "bench-output" / "prf_timemodel"
    root.mkdir(parents=True, exist_ok=True)
    rows, costs = [], []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for name in names:
            for drifting in (True, False):
                r, (static, moving), sim = run_field(name, drifting, n_frames, Path(tmp))
                rows += r
                if drifting:
                    build_static, build_time = build_cost(sim)
                    costs.append(
                        [
                            name,
                            f"{1e3 * static:.1f}",
                            f"{1e3 * moving:.1f}",
                            f"{moving / static:.0f}x",
                            f"{build_static:.1f}",
                            f"{build_time:.1f}",
                        ]
                    )
                print(f"  {name} {'drift' if drifting else 'no drift'} done", flush=True)
    print_table(
        rows,
        [
            "field",
            "fluxes",
            "scatter / oracle",
            "chi iso",
            "chi blends",
            "variables |rel|",
            "transform rms (mpix)",
            "photref prf (s)",
        ],
        title=f"PRF time model, {n_frames} frames (photref prf as a process; oracle: true PRF, true "
        "positions)",
    )
    print_table(
        costs,
        [
            "field",
            "fit static (ms/frame)",
            "fit time model (ms/frame)",
            "ratio",
            "build static (s)",
            "build time model (s)",
        ],
        title="Cost in process (one BLAS thread; the time model's build includes the static shape)",
    )
    print("load average:", load_average())


if __name__ == "__main__":
    main()
