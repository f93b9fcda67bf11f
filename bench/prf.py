"""Benchmark: PRF photometry as a user runs it (``photref prf`` as a process) against psfmachine 1.1.4 itself,
on the same simulated frames, one after the other in one run.

The field (``photref_core.simulate.fields``, Roman-like: 0.11"/pix, FWHM 2.2 px, the asymmetric PRF of the
accuracy bench, 15 % of the stars in close pairs, catalog fluxes with 10 % scatter; SPEC 6's radii: rmax 2",
sparse_dist_lim 4", i.e. 18 and 36 px) is crowded at the default shape, 1,500 stars on 512 x 512 x 40
frames: every source overlaps ~20 others and all of them chain into one group, which is what made the
per-frame solve a dense 1,500 x 1,500 system.

Phases:

(a) **psfmachine 1.1.4**: ``bench/peers/psfmachine_fit.py`` run by the python of psfmachine's own
    environment (``bench/peers/psfmachine/``, made on first use by ``bench/peers/psfmachine_env.py``), one
    process timed from outside, its phases (import, reading, ``Machine(...)``, ``build_shape_model()``,
    ``fit_model()``) timed inside. Same radii and knots as photref; its source-mask radius limits (Kepler
    defaults 28" and 4.5", which find no star at 0.11"/pix) scaled like ``sparse_dist_lim`` (40" -> 4").
(b) **photref prf, running server**: ``photref server start`` (timed apart), then ``photref prf STORE
    'frames/*.fits' --catalog CAT --output fluxes.fits`` into a fresh store; its task runs are read back
    from the server, so the process time is split into image ingestion, shape model, the fits (first fit
    start to last fit end) and writing the products, the rest being process start, imports and Prefect.
(c) **photref prf, temporary server**: the same command with no server running.

Each photref mode has its own Prefect home, set up by one untimed command first (Prefect's database
migrations, once per home). Accuracy against the truth is printed for both tools (isolated stars; the flux
inside rmax for photref, SPEC 6; psfmachine's v1.1.4 renormalisation scales its fluxes, so its scale is
printed and its scatter is also given after dividing the scale out). The target of issue 28: photref at most
1/3 of psfmachine's process time with a running server at 1,500 x 512 x 40.

Then, unless ``--no-kernel``, the in-process kernel figures: on the same field, photref's per-frame fit with
the solve plan built once (one BLAS thread) against psfmachine's per-frame method (dense normal matrix,
``solve`` and ``inv``) on the same model, and the sparse-field cases of ``bench/prf_kernel.py``.

``--time-model``: instead, the time model (SPEC 6, both parts) against psfmachine's on a Kepler-like field
(psfmachine's home ground; 200 stars on 128 x 128 x 80 frames, ``--quick`` 100 x 96 x 40) that drifts (0.5
px, and a plate-scale change moving the edge by 0.25 px) and changes focus (the core's FWHM 10 % wider by
the end): ``photref prf --time-model --perturbation`` as a process (temporary server; its static flux set
read from the same cached run) and psfmachine 1.1.4's ``build_time_model()`` + ``fit_model(fit_va=True)``
as a process, once with photref's time settings (``time_nknots``, ``time_radius`` and a ``time_resolution``
giving the same time bins) and once with its defaults. Printed: wall seconds and the light curves' scatter
(median over isolated stars of std / median of fitted / true) over the oracle's (the true PRF at the true
positions, ``fields.oracle_fit``), scale-free because psfmachine renormalises its fluxes.

Run: ``.venv/bin/python bench/prf.py [--quick | --shape STARSxSIZExFRAMES] [--no-kernel] [--workdir DIR]``
(``--no-psfmachine --modes server`` runs photref's half only: what the test suite runs, on a tiny shape)
(default shape 1500x512x40, ~3 minutes here plus psfmachine's environment once; ``--quick`` 400x256x10).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

try:
    from bench._common import REPO, load_average, machine_description, print_table
except ModuleNotFoundError:  # run as ``python bench/prf.py``: bench/ is on sys.path, not the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench._common import REPO, load_average, machine_description, print_table
from bench.cli import PHOTREF, photref_env, task_runs, timed_process
from bench.prf_accuracy import read_fluxes

DRIVER = REPO / "bench" / "peers" / "psfmachine_fit.py"
TARGET_FRACTION = 1 / 3  # photref's process time over psfmachine's, running server, full shape
TARGET_FIT_FRACTION = 1 / 20  # photref's per-frame fit over psfmachine's
#: psfmachine's FFI defaults (arcsec; set for Kepler); its source mask's upper / lower radius limits at them.
PSFMACHINE_DEFAULTS = dict(rmin=1.0, rmax=16.0, cut_r=6.0, sparse_dist_lim=40.0)
PSFMACHINE_RADIUS_LIMITS = (28.0, 4.5)
MODES = ("server", "temporary")
LABELS = {"server": "running server", "temporary": "temporary server"}


@dataclass(frozen=True)
class Shape:
    stars: int
    size: int
    frames: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        stars, size, frames = (int(v) for v in text.lower().split("x"))
        return cls(stars, size, frames)

    @property
    def tag(self) -> str:
        return f"{self.stars}x{self.size}x{self.frames}"

    def __str__(self) -> str:
        return f"{self.stars:,} stars on {self.size}x{self.size} x {self.frames} frames"


FULL = Shape(1500, 512, 40)
QUICK = Shape(400, 256, 10)


def simulated_field(shape: Shape, workdir: Path) -> dict:
    """The field's frames, catalog and truth (simulated afresh: a few seconds)."""
    from photref_core.simulate.fields import simulate_field

    directory = workdir / f"field-{shape.tag}"
    shutil.rmtree(directory, ignore_errors=True)
    return simulate_field(
        directory, "roman", seed=28, n_frames=shape.frames, n_stars=shape.stars, size=shape.size
    )


def radius_options(radii: dict) -> list[str]:
    """``--rmin=... --rmax=... --cut-r=... --sparse-dist-lim=...`` (arcsec), for photref and the driver."""
    return [f"--{k.replace('_', '-')}={radii[k]:g}" for k in ("rmin", "rmax", "cut_r", "sparse_dist_lim")]


def prf_arguments(sim: dict) -> list[str]:
    """The PRF options both tools get: SPEC 6's radii at the field's sampling."""
    return radius_options(sim["prf_params"])


def run_psfmachine(
    frames: str, catalog: str, radii: dict, output: Path, work: Path, extra: tuple = ()
) -> tuple[float, dict]:
    """psfmachine 1.1.4 (``DRIVER`` in its own environment, made on first use) on FITS frames with
    ``radii`` (arcsec), its source mask's radius limits scaled like ``sparse_dist_lim`` from its defaults;
    fluxes to ``output`` (.npz); ``extra``: more driver options (its time model's). Returns the process's
    wall seconds and the driver's JSON line."""
    from bench.peers.psfmachine_env import ensure_psfmachine_venv

    python = ensure_psfmachine_venv(REPO)
    scale = radii["sparse_dist_lim"] / PSFMACHINE_DEFAULTS["sparse_dist_lim"]
    upper, lower = (limit * scale for limit in PSFMACHINE_RADIUS_LIMITS)
    args = [str(python), "-I", str(DRIVER), "--frames", frames, "--catalog", catalog]
    args += ["--output", str(output), *radius_options(radii)]
    args += [f"--upper-radius-limit={upper:g}", f"--lower-radius-limit={lower:g}", *extra]
    wall, out = timed_process(args, {"PATH": "/usr/bin:/bin", "HOME": str(work)}, work / "psfmachine.log")
    return wall, json.loads(out.strip().splitlines()[-1])


def psfmachine_process(sim: dict, work: Path) -> dict:
    """psfmachine 1.1.4 on the same frames, as one process in its own environment; its figures."""
    frames = str(Path(sim["paths"][0]).parent / "*.fits")
    output = work / "psfmachine.npz"
    wall, result = run_psfmachine(frames, sim["catalog"], sim["prf_params"], output, work)
    with np.load(output) as z:
        fluxes = {k: z[k] for k in ("flux", "flux_err", "source_id")} | {
            "frame_id": z["frame_id"].astype(str)
        }
    return result | {"process_s": wall, "fluxes": fluxes}


def phases(runs, wall: float) -> dict[str, float]:
    """A ``photref prf`` process's seconds by phase, from its task runs (spans: first start to last end)."""
    groups = {
        "images in": ("plan images", "ingest images", "finalize images"),
        "shape model": ("shape model",),
        "fits": ("fit frames",),
        "products": ("write ",),
    }
    out = {}
    for phase, prefixes in groups.items():
        mine = [r for r in runs if r.name.startswith(prefixes)]
        if mine:
            out[phase] = (max(r.end_time for r in mine) - min(r.start_time for r in mine)).total_seconds()
    out["the rest"] = wall - sum(out.values())
    return out


def photref_process(sim: dict, work: Path, mode: str) -> dict:
    """``photref prf`` into a fresh store, with its own Prefect home; ``mode`` 'server' or 'temporary'."""
    home = work / f"prefect-{mode}"
    env = photref_env(home)
    store, output = work / f"{mode}.zarr", work / f"{mode}-fluxes.fits"
    frames = str(Path(sim["paths"][0]).parent / "*.fits")
    log = work / f"{mode}.log"
    # Prefect's database, once per home (untimed): a one-frame run into a scratch store.
    warm = work / f"warm-{mode}.zarr"
    first = [PHOTREF, "prf", str(warm), sim["paths"][0], "--catalog", sim["catalog"]]
    timed_process([*first, "--output", str(work / "warm.fits"), "--no-plot", *prf_arguments(sim)], env, log)
    shutil.rmtree(warm, ignore_errors=True)
    result: dict = {}
    args = [PHOTREF, "prf", str(store), frames, "--catalog", sim["catalog"], "--output", str(output)]
    args += [*prf_arguments(sim), "--json"]
    if mode == "server":
        result["server start s"], _ = timed_process([PHOTREF, "server", "start"], env, log)
    try:
        result["process_s"], out = timed_process(args, env, log)
        if mode == "server":
            api_url = json.loads((home / "photref-server.json").read_text())["api_url"]
            run_id = json.loads(out).get("flow_run_id")
            result["phases"] = phases(task_runs(api_url, home, run_id), result["process_s"])
    finally:
        if mode == "server":
            subprocess.run([PHOTREF, "server", "stop"], env=env, capture_output=True, cwd=REPO)
    result["output"], result["store"] = str(output), str(store)
    return result


def accuracy(sim: dict, fluxes: dict, frame_ids) -> dict:
    """Scores against the truth (``fields.score_fluxes``) and the scatter of isolated stars once their
    median scale is divided out."""
    from photref_core.simulate.fields import score_fluxes, true_fluxes

    truth = Table.read(sim["truth"])
    by_frame = {str(f): k for k, f in enumerate(dict.fromkeys(str(x) for x in truth["frame_id"]))}
    order = [by_frame[str(f)] for f in frame_ids]
    true = true_fluxes(sim, sim["prf_params"]["rmax"])[order]
    ns = true.shape[1]
    pair_id, edge = np.asarray(truth["pair_id"][:ns]), np.asarray(truth["edge"][:ns], bool)
    score = score_fluxes(fluxes["flux"], fluxes["flux_err"], true, pair_id, edge)
    iso = (pair_id < 0) & ~edge
    ratio = (fluxes["flux"] / true)[:, iso]
    ratio = ratio[np.isfinite(ratio)]
    score["median_abs_rel_err_scale_removed"] = float(np.median(np.abs(ratio / np.median(ratio) - 1)))
    score["nan_fraction"] = float(np.mean(~np.isfinite(fluxes["flux"])))
    return score


def kernel_figures(sim: dict, store: str, n_dense: int = 2) -> dict:
    """In process, on the field photref's run stored: the per-frame fit with the solve plan built once
    (after a first fit that builds it; one BLAS thread) against psfmachine's per-frame method."""
    from threadpoolctl import threadpool_limits

    from bench.prf_kernel import baseline_fit_frame
    from photref_core.prf import steps
    from photref_core.simulate.fields import load_frames
    from photref_core.store.schema import open_group

    groups = [
        name for name, _ in open_group(store, path="prf", mode="r").groups() if name.startswith("model-")
    ]
    model = steps.load_prf_model(store, f"prf/{groups[0]}")
    flux, err, mask, wcs = load_frames(sim["paths"][: min(8, len(sim["paths"]))])
    start = time.perf_counter()
    plan = model.frames.plan(wcs[0], flux.shape[1:])
    plan_s = time.perf_counter() - start
    with threadpool_limits(limits=1, user_api="blas"):
        start = time.perf_counter()
        res = model.fit(flux, err, mask=mask, wcs=wcs)
        fit_s = (time.perf_counter() - start) / flux.shape[0]
        X = model.model_for(wcs[0], flux.shape[1:])
        dense, worst = [], 0.0
        for k in range(min(n_dense, flux.shape[0])):
            f = np.where(mask[k], np.nan, flux[k]).ravel().astype(float)
            start = time.perf_counter()
            w, werr = baseline_fit_frame(
                X, f, err[k].ravel().astype(float), model.prior_mu, model.prior_sigma
            )
            dense.append(time.perf_counter() - start)
            ok = res.flag[k] == 0
            worst = max(worst, float(np.max(np.abs(w[ok] - res.flux[k, ok]) / res.flux_err[k, ok])))
    return {
        "plan_s": plan_s,
        "fit_ms": 1e3 * fit_s,
        "dense_ms": 1e3 * float(np.median(dense)),
        "groups": int(plan.n_groups),
        "largest_group": int(plan.group_sizes.max()),
        "largest_block": int(plan.largest_block),
        "pairs_per_source": float(plan.pair_i.size * 2 / model.nsources),
        "max_diff_sigma": worst,
    }


def run(shape: Shape, workdir: Path, kernel: bool, peer: bool = True, modes=None) -> dict:
    """The phases (see the module docstring); the figures, also written to ``results-<shape>.json``."""
    modes = MODES if modes is None else tuple(modes)
    work = workdir / f"runs-{shape.tag}"
    for mode in MODES:
        subprocess.run(
            [PHOTREF, "server", "stop"], env=photref_env(work / f"prefect-{mode}"), capture_output=True
        )
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {"shape": str(shape), "machine": machine_description(), "load_start": load_average()}
    sim = simulated_field(shape, workdir)
    truth = Table.read(sim["truth"])
    frame_ids = list(dict.fromkeys(str(f) for f in truth["frame_id"]))
    source_ids = np.asarray(truth["source_id"][truth["frame_id"] == truth["frame_id"][0]])
    if peer:
        print(f"{shape}: psfmachine 1.1.4 ...", flush=True)
        fitted = psfmachine_process(sim, work)
        results["psfmachine"] = {k: v for k, v in fitted.items() if k != "fluxes"}
        peer_ids = [str(f) for f in fitted["fluxes"]["frame_id"]]
        results["psfmachine"]["accuracy"] = accuracy(sim, fitted["fluxes"], peer_ids)
    for mode in modes:
        print(f"{shape}: photref prf, {LABELS[mode]} ...", flush=True)
        results[mode] = photref_process(sim, work, mode)
        flux, err = read_fluxes(results[mode]["output"], frame_ids, source_ids)
        results[mode]["accuracy"] = accuracy(sim, {"flux": flux, "flux_err": err}, frame_ids)
    if kernel and "server" in modes:
        print(f"{shape}: in-process kernel ...", flush=True)
        results["kernel"] = kernel_figures(sim, results["server"]["store"])
    results["load_end"] = load_average()
    (workdir / f"results-{shape.tag}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def report(results: dict) -> None:
    """Print the figures of :func:`run`."""
    print(f"\n{results['shape']}")
    pm = results.get("psfmachine")
    if pm:
        s = pm["seconds"]
        pm_frame_ms = 1e3 * s["fit"] / pm["n_frames"]
        print(
            f"psfmachine 1.1.4 as a process: {pm['process_s']:.1f} s (import {s['import']:.1f}, reading"
            f" {s['read']:.1f}, Machine() {s['init']:.1f}, build_shape_model {s['shape model']:.1f},"
            f" fit_model {s['fit']:.1f} s = {pm_frame_ms:.0f} ms a frame)"
        )
    for mode in (m for m in MODES if m in results):
        r = results[mode]
        line = f"photref prf, {LABELS[mode]}: {r['process_s']:.1f} s"
        if "phases" in r:
            line += " (" + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()) + " s)"
        if "server start s" in r:
            line += f"; photref server start {r['server start s']:.1f} s, once, not counted"
        print(line)
    if pm:
        for mode in (m for m in MODES if m in results):
            fraction = results[mode]["process_s"] / pm["process_s"]
            target = f"; target <= 1/3: {'met' if fraction <= TARGET_FRACTION else 'MISSED'}"
            print(
                f"photref / psfmachine, {LABELS[mode]}: {fraction:.2f}"
                f" ({1 / fraction:.1f}x as fast{target if mode == 'server' else ''})"
            )
    scored = [(f"photref ({LABELS[mode]})", results[mode]["accuracy"]) for mode in MODES if mode in results]
    if pm:
        scored.append(("psfmachine 1.1.4", pm["accuracy"]))
    rows = []
    for name, acc in scored:
        rows.append(
            [
                name,
                f"{acc['flux_scale']:.4f}",
                f"{acc['isolated_median_abs_rel_err']:.2%}",
                f"{acc['median_abs_rel_err_scale_removed']:.2%}",
                f"{acc['isolated_chi_std']:.2f}",
                f"{acc['blends_chi_std']:.2f}",
                f"{acc['nan_fraction']:.1%}",
            ]
        )
    print_table(
        rows,
        [
            "isolated stars",
            "flux/true",
            "med |rel|",
            "med |rel| scale removed",
            "chi std",
            "chi std blends",
            "NaN",
        ],
        title="accuracy against the truth (flux inside rmax)",
    )
    k = results.get("kernel")
    if k:
        fit_met = "met" if pm and k["fit_ms"] <= TARGET_FIT_FRACTION * pm_frame_ms else "MISSED"
        peer_fit = f"{pm_frame_ms:.0f}" if pm else "(not run)"
        print(
            f"in process, one BLAS thread: solve plan {k['plan_s']:.2f} s once; fit {k['fit_ms']:.1f} ms a"
            f" frame against the dense per-frame solve {k['dense_ms']:.0f} ms on the same model"
            f" ({k['dense_ms'] / k['fit_ms']:.0f}x; max difference {k['max_diff_sigma']:.1e} sigma);"
            f" psfmachine's own fit_model {peer_fit} ms a frame (target <= 1/20: {fit_met});"
            f" {k['groups']} group(s), the largest {k['largest_group']} sources in blocks of <="
            f" {k['largest_block']}, {k['pairs_per_source']:.0f} overlapping neighbours a source"
        )


#: ``--time-model``: a Kepler-like field (psfmachine's home ground; 4"/pix, FWHM 1.5 px) that drifts (0.5 px,
#: a plate-scale change moving the edge by 0.25 px) and changes focus (the core's FWHM 10 % wider by the end).
TIME_FIELD = dict(drift=0.5, focus_change=0.10)
TIME_FULL, TIME_QUICK = Shape(200, 128, 80), Shape(100, 96, 40)


def relative_scatter(fitted, true, pair_id, edge) -> float:
    """Median over isolated stars of the std over frames of fitted / true over its median: the light curves'
    scatter whatever a tool's flux scale (psfmachine 1.1.4 renormalises its fluxes)."""
    iso = (np.asarray(pair_id) < 0) & ~np.asarray(edge, bool)
    ratio = (np.asarray(fitted) / true)[:, iso]
    return float(np.nanmedian(np.nanstd(ratio, axis=0) / np.nanmedian(ratio, axis=0)))


def time_model_run(workdir: Path, shape: Shape, peer: bool) -> dict:
    """photref prf --time-model --perturbation (a process, Prefect's temporary server) and psfmachine 1.1.4's
    build_time_model() + fit_model(fit_va=True) (a process) on one drifting, focus-changing field; their
    wall times and light-curve scatter over the oracle's (the true PRF at the true positions)."""
    from photref_core.prf.parameters import PRF_DEFAULTS, PRFParameters
    from photref_core.prf.perturbation import box_radius, time_bins
    from photref_core.simulate.fields import load_frames, oracle_fit, simulate_field, true_fluxes

    n_frames = shape.frames
    field = dict(TIME_FIELD, n_stars=shape.stars, size=shape.size, scale_drift=0.25 / (shape.size / 2))
    work = workdir / f"time-model-{shape.tag}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sim = simulate_field(work / "field", "kepler", seed=30, n_frames=n_frames, **field)
    truth = Table.read(sim["truth"])
    frame_ids = list(dict.fromkeys(str(f) for f in truth["frame_id"]))
    ns = int(np.sum(truth["frame_id"] == truth["frame_id"][0]))
    source_ids = np.asarray(truth["source_id"][:ns])
    pair_id, edge = np.asarray(truth["pair_id"][:ns]), np.asarray(truth["edge"][:ns], bool)
    flux, err, mask, _ = load_frames(sim["paths"])
    oracle = relative_scatter(oracle_fit(sim, flux, err, mask)[0], true_fluxes(sim), pair_id, edge)
    true = true_fluxes(sim, sim["prf_params"]["rmax"])
    results: dict = {"field": f"Kepler-like, {ns} stars on {field['size']}^2 x {n_frames} frames", "rows": []}

    def add(name, seconds, fitted, note=""):
        scatter = relative_scatter(fitted, true, pair_id, edge)
        results["rows"].append({"run": name, "s": seconds, "scatter/oracle": scatter / oracle, "note": note})

    # photref: the command as a user runs it, then the static fluxes of the same (cached) run.
    env = photref_env(work / "prefect")
    frames, log = str(Path(sim["paths"][0]).parent / "*.fits"), work / "photref.log"
    warm = [PHOTREF, "prf", str(work / "warm.zarr"), sim["paths"][0], "--catalog", sim["catalog"]]
    timed_process([*warm, "--output", str(work / "warm.fits"), "--no-plot", *prf_arguments(sim)], env, log)
    args = [PHOTREF, "prf", str(work / "s.zarr"), frames, "--catalog", sim["catalog"], *prf_arguments(sim)]
    args += ["--time-model", "--perturbation", "--no-plot"]
    seconds, _ = timed_process([*args, "--output", str(work / "time.fits")], env, log)
    timed_process([*args, "--output", str(work / "static.fits"), "--output-fluxes", "static"], env, log)
    static, _ = read_fluxes(str(work / "static.fits"), frame_ids, source_ids)
    moving, _ = read_fluxes(str(work / "time.fits"), frame_ids, source_ids)
    add("photref prf --time-model --perturbation", seconds, moving, "process, temporary server")
    add("photref, same run, static fluxes", None, static, "the run's static flux set")
    if peer:
        radius = box_radius(PRFParameters(**sim["prf_params"]))  # photref's default time_radius
        bins, _ = time_bins(np.arange(n_frames, dtype=float), PRF_DEFAULTS["time_resolution"])
        resolution = int(np.ceil(n_frames / len(bins)))
        settings = {
            "photref's time settings": [
                f"--time-nknots={PRF_DEFAULTS['time_nknots']}",
                f"--time-resolution={resolution}",
                f"--time-radius={radius:g}",
            ],
            'its defaults (time_resolution 200, time_radius 8")': [],
        }
        for label, options in settings.items():
            output = work / f"psfmachine-{len(options)}.npz"
            try:
                wall, info = run_psfmachine(
                    frames, sim["catalog"], sim["prf_params"], output, work, ("--time-model", *options)
                )
            except SystemExit as exc:  # psfmachine failing is a figure too
                last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "failed"
                results["rows"].append(
                    {
                        "run": f"psfmachine, {label}",
                        "s": None,
                        "scatter/oracle": None,
                        "note": f"failed: {last[:120]}",
                    }
                )
                continue
            with np.load(output) as z:
                order = [list(z["frame_id"].astype(str)).index(f) for f in frame_ids]
                fitted_va, fitted = z["flux_time"][order], z["flux"][order]
            phase = info["seconds"]
            note = f"time model {phase['time model']:.1f} s, fits {phase['fit']:.1f} s"
            add(f"psfmachine 1.1.4, {label}: fit_va", wall, fitted_va, note)
            add(f"psfmachine 1.1.4, {label}: static", None, fitted, "the same process's fit_model")
    results["oracle_scatter"] = oracle
    (workdir / f"results-time-model-{shape.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def time_model_report(results: dict) -> None:
    """Print :func:`time_model_run`'s figures."""
    rows = [
        [
            r["run"],
            "" if r["s"] is None else f"{r['s']:.1f}",
            "" if r["scatter/oracle"] is None else f"{r['scatter/oracle']:.3f}",
            r["note"],
        ]
        for r in results["rows"]
    ]
    print_table(
        rows,
        ["run", "s", "scatter / oracle", ""],
        title=f"time model on {results['field']} (oracle's scatter {results['oracle_scatter']:.4%})",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="shape", action="store_const", const=QUICK, help=f"{QUICK}")
    size.add_argument("--shape", type=Shape.parse, help=f"STARSxSIZExFRAMES (default {FULL.tag})")
    parser.add_argument(
        "--no-kernel", dest="kernel", action="store_false", help="skip the in-process figures"
    )
    parser.add_argument("--no-psfmachine", dest="peer", action="store_false", help="photref's half only")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="photref's modes")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-output" / "prf")
    parser.add_argument(
        "--time-model",
        action="store_true",
        help="the time model against psfmachine's on a drifting, focus-changing Kepler-like field instead",
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine_description()}\nload: {load_average()}", flush=True)
    if args.time_model:
        shape = TIME_QUICK if args.shape == QUICK else (args.shape or TIME_FULL)
        time_model_report(time_model_run(args.workdir.resolve(), shape, args.peer))
        print(f"\nload at the end: {load_average()}")
        return 0
    results = run(args.shape or FULL, args.workdir.resolve(), args.kernel, args.peer, args.modes)
    report(results)
    if args.kernel:
        from bench import prf_kernel

        print("\nsparse fields (bench/prf_kernel.py, in process):", flush=True)
        prf_kernel.main([] if args.shape in (None, FULL) else ["--quick"])  # full cases with the full shape
    print(f"\nload at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
