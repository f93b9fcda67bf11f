"""Benchmark of the ingestion of frame photometry files into the zarr store (SPEC 2): core loop vs flow.

What is measured
----------------
Two shapes (frames x stars x photometries), each in one process, each phase into a fresh store:

* ``big``: AutoWISP's "big" shape, 1,120 x 896 x 7 (target under 5 s; AutoWISP itself on the same shape
  is measured beside photref by ``bench/cli.py --full``, not here);
* ``large``: 2,000 x 20,000 x 4 by default (``--large-frames``/``--large-stars``/``--large-photometries``;
  the issue's 5,000 x 20,000 x 4 needs about 6.5 GB of frame files and twice the time).

Phases, in this order, all on the same frame files:

1. ``plain serial``: the core calls in a plain loop, no Prefect:
   ``photref_core.ingest.photometry.plan_ingestion``, ``ingest_batch`` for every batch one after the
   other, ``finalize_ingestion``;
2. ``plain 2 threads``: the same calls, the batches through a ``ThreadPoolExecutor(max_workers=2)`` (the
   parallelism the flow gets), so that the flow's own cost can be told from the gain of running two
   writers at once;
3. ``flow``: the Prefect flow ``flows.ingest.ingest_frames`` through ``run_ingest(..., max_workers=2)``
   (a bounded ``ThreadPoolTaskRunner``): plan task, one task per frame chunk, finalise task, progress and
   markdown artifacts. ``run_ingest`` is the entry point of runs started by hand, which run without
   Prefect's flow-run heartbeat (``flows/runners.py`` says why);
4. ``flow re-run``: the same flow again on the unchanged frames into the same store (every frame skipped);
5. ``flow object`` (``big`` only): the flow object ``ingest_frames`` called directly, i.e. with Prefect's
   default flow-run heartbeat, as a deployment run has it: Prefect 3.8.8 joins its heartbeat thread at the
   end of every flow run, and that thread sleeps in 1-s steps, which adds up to 1 s to every run.

Every phase of ``big`` runs 3 times (``--big-repeats``) and the fastest run counts (the machine is shared;
other users' load only ever adds time); ``large`` runs once (``--large-repeats``). Before each run the
bench waits (at most 15 s) until the Prefect server is idle, since it digests the previous run's events on
the same two cores.

Figures: wall time (``time.perf_counter`` around the call), frames/s, MB/s (bytes of the input frame files
/ wall time; 1 MB = 10^6 bytes), peak RSS of the process during the phase (``psutil`` sampled every 10 ms
by a thread; ``ru_maxrss`` is printed too but only ever grows), CPU seconds of this process and of the
Prefect server's processes during the phase, and the orchestration overhead ``flow / plain serial`` (the
issue's ratio; target under 1.5x) and ``flow / plain 2 threads``. Before the shapes, a calibration runs
flows of no-op tasks to give Prefect's fixed cost per flow run and its cost per task.

Timings exclude: writing the frame files (done once, cached in ``<workdir>/frames-*``; files written
directly with ``astropy.io.fits.BinTableHDU``: int64 ``source_id``, float64 ``mag`` and ``mag_err`` of shape
(n, P), FRAMEID and JD in the table header; every frame holds a random 90 % of the stars in random row
order and 1 % NaN magnitudes), the Prefect server start (printed separately), and a first warm-up flow run
(one-time client and engine set-up in the process). The page cache is warm (every frame file is read once
before timing), so the figures are CPU- and zarr-bound, not disk-bound.

Where: measured on a 2-core, 24 GiB machine with Python 3.11 (numpy 2.4, zarr 3.1, astropy 8, Prefect
3.8.8), shared with other engineers (the load average is printed). The Prefect server is a temporary local
server with a SQLite database started by ``prefect.testing.utilities.prefect_test_harness()`` once before
any timing; it runs in a subprocess on the same two cores, so its CPU competes with the flow. When
``PREFECT_API_URL`` is set, that server is used instead and none is started. ``PREFECT_HOME`` is set to
``<workdir>/prefect-home``, analytics are off and Prefect logs at WARNING.

Correctness is checked at the end of every shape: the stores of every phase hold identical ``mag`` and
``mag_err`` (compared per block of frames by a SHA-256 of the values with NaNs made canonical, which is
``np.array_equal(..., equal_nan=True)`` without keeping two stores on disk; each store is deleted once
hashed unless ``--keep-stores``), identical axes, every frame ingested; a few frames are also compared with
their files, with ``np.array_equal(..., equal_nan=True)``.

Usage::

    .venv/bin/python bench/ingest.py              # both shapes: about 5 min on an idle machine
    .venv/bin/python bench/ingest.py --quick      # smoke run: tiny shapes; ~30 s, mostly the server start
    .venv/bin/python bench/ingest.py --profile    # + breakdown, cProfile, codec and FITS-reader probes (big)
    .venv/bin/python bench/ingest.py --large-frames 5000   # the issue's 5,000 x 20,000 x 4 (6.5 GB of files)
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

try:
    from bench._common import (
        REPO,
        PeakRSS,
        dir_bytes,
        load_average,
        machine_description,
        print_table,
        ru_maxrss_mib,
    )
except ModuleNotFoundError:  # run as ``python bench/ingest.py``: bench/ is on sys.path, not the repo
    from _common import (
        REPO,
        PeakRSS,
        dir_bytes,
        load_average,
        machine_description,
        print_table,
        ru_maxrss_mib,
    )

TARGET_BIG_SECONDS = 5.0
TARGET_OVERHEAD = 1.5
MAX_WORKERS = 2
GENERATOR_VERSION = 1
SEEN_FRACTION = 0.9
NAN_FRACTION = 0.01
GAIA_ID_BASE = 4_295_806_720_000_000_000
HASH_BLOCK_FRAMES = 256


# --------------------------------------------------------------------------------------------------
# Frame files
# --------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    name: str
    frames: int
    stars: int
    photometries: int
    target_s: float | None = None  # the target for the flow's wall time
    repeats: int = 1
    heartbeat_phase: bool = False  # also call the flow object (Prefect's default flow-run heartbeat)
    profile: bool = False  # profiled under --profile (every shape with --profile-all)

    def __str__(self):
        return f"{self.frames:,} frames x {self.stars:,} stars x {self.photometries} photometries"


def write_frames(workdir: Path, shape: Shape, seed: int = 0) -> tuple[list[str], int, float]:
    """Write (or reuse) the frame files of ``shape``; return (sorted paths, total bytes, seconds spent)."""
    from astropy.io import fits

    d = workdir / f"frames-{shape.frames}x{shape.stars}x{shape.photometries}-s{seed}"
    manifest = d / "manifest.json"
    want = {
        "frames": shape.frames,
        "stars": shape.stars,
        "photometries": shape.photometries,
        "seed": seed,
        "generator": GENERATOR_VERSION,
        "seen_fraction": SEEN_FRACTION,
    }
    paths = [str(d / f"bench-{i:06d}.fits") for i in range(shape.frames)]
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want and all(os.path.exists(p) for p in paths):
            return paths, int(have["bytes"]), 0.0
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    n, p = shape.stars, shape.photometries
    ids = np.sort(GAIA_ID_BASE + rng.choice(10**15, size=n, replace=False).astype(np.uint64)).astype(np.int64)
    base = rng.uniform(8.0, 16.0, (n, p))
    n_seen = max(1, round(SEEN_FRACTION * n))
    total = 0
    for i, path in enumerate(paths):
        frng = np.random.default_rng([seed, i])
        rows = frng.permutation(n)[:n_seen]  # a random subset of the stars, in random row order
        mag = base[rows] + frng.normal(0.0, 0.01, (n_seen, p))
        mag[frng.random(mag.shape) < NAN_FRACTION] = np.nan
        err = frng.uniform(0.002, 0.05, (n_seen, p))
        table = fits.BinTableHDU.from_columns(
            [
                fits.Column("source_id", "K", array=ids[rows]),
                fits.Column("mag", f"{p}D", array=mag),
                fits.Column("mag_err", f"{p}D", array=err),
            ]
        )
        table.header["FRAMEID"] = f"bench-{i:06d}"
        table.header["JD"] = 2460400.5 + 0.01 * i
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(path, overwrite=True)
        total += os.path.getsize(path)
    manifest.write_text(json.dumps({**want, "bytes": total}))
    return paths, total, time.perf_counter() - start


def warm_page_cache(paths: list[str]) -> float:
    """Read every file once so that every phase sees the same (warm) page cache; return seconds."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(16 * 2**20):
                pass
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    wall_s: float
    frames: int  # frames the phase ingested (or skipped, for the re-run)
    input_bytes: int
    peak_rss_mib: float
    rss_growth_mib: float
    cpu_s: float  # this process, user + system
    server_cpu_s: float | None  # the Prefect server's processes (None: not ours to see)
    extra: dict = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.wall_s


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _server_cpu_seconds() -> float | None:
    """CPU seconds used so far by this process's children (the harness' Prefect server and its workers)."""
    total = 0.0
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return None
    if not children:
        return None
    for child in children:
        try:
            total += _cpu_seconds(child)
        except psutil.Error:
            pass
    return total


def measure(name: str, fn, frames: int, input_bytes: int) -> tuple[Phase, object]:
    """Run ``fn()`` once, timing it; return the phase figures and what ``fn`` returned."""
    waited = wait_for_quiet_server()
    gc.collect()
    proc = psutil.Process()
    cpu0, srv0 = _cpu_seconds(proc), _server_cpu_seconds()
    with PeakRSS() as rss:
        start = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - start
    cpu1, srv1 = _cpu_seconds(proc), _server_cpu_seconds()
    server = None if srv0 is None or srv1 is None else srv1 - srv0
    phase = Phase(name, wall, frames, input_bytes, rss.peak_mib, rss.growth_mib, cpu1 - cpu0, server)
    phase.extra["waited_s"] = waited
    return phase, out


def plain_loop(store: str, paths: list[str], workers: int = 1, scan_workers: int = 2) -> dict:
    """The core calls without Prefect: plan, every batch (serially or in a thread pool), finalise."""
    from photref_core.ingest import photometry as core

    plan = core.plan_ingestion(store, paths, scan_workers=scan_workers)
    results = []
    if workers <= 1:
        for batch in plan.batches:
            results.extend(core.ingest_batch(store, batch))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for batch_results in pool.map(lambda b: core.ingest_batch(store, b), plan.batches):
                results.extend(batch_results)
    summary = core.finalize_ingestion(store, results)
    summary["batches"] = len(plan.batches)
    return summary


def flow_run(store: str, paths: list[str], flow_object: bool = False) -> dict:
    """``run_ingest(store, paths, max_workers=2)`` (no flow-run heartbeat); ``flow_object=True`` calls the
    flow object itself on the same task runner instead (Prefect's default heartbeat), to show its cost."""
    from flows.ingest import ingest_frames, run_ingest
    from flows.runners import make_task_runner

    if not flow_object:
        return run_ingest(store, paths, max_workers=MAX_WORKERS)
    return ingest_frames.with_options(task_runner=make_task_runner(MAX_WORKERS))(store=store, frames=paths)


def wait_for_quiet_server(max_wait_s: float = 15.0, window_s: float = 0.25, busy: float = 0.05) -> float:
    """Wait until the Prefect server's processes use under ``busy`` of a core (they digest the events of the
    previous phase for a while, on the same two cores); return the seconds waited."""
    start = time.perf_counter()
    before = _server_cpu_seconds()
    if before is None:
        return 0.0
    while time.perf_counter() - start < max_wait_s:
        time.sleep(window_s)
        after = _server_cpu_seconds()
        if after is None or after - before < busy * window_s:
            break
        before = after
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------


def store_fingerprint(store: str) -> dict:
    """Axes and frame states (exact values) and per-block SHA-256 of ``mag``/``mag_err`` (NaNs canonical)."""
    import zarr

    group = zarr.open_group(store, mode="r")
    out = {name: group[name][:] for name in ("source_id", "frame_id", "time", "frame_state")}
    n_frames = group["mag"].shape[0]
    for name in ("mag", "mag_err"):
        arr = group[name]
        digests = []
        for lo in range(0, n_frames, HASH_BLOCK_FRAMES):
            block = np.array(arr[lo : lo + HASH_BLOCK_FRAMES], dtype=np.float64)
            block[np.isnan(block)] = np.nan  # one NaN bit pattern: equal_nan semantics
            digests.append(hashlib.sha256(block.tobytes()).hexdigest())
        out[name] = digests
    out["shape"] = group["mag"].shape
    return out


def fingerprints_equal(a: dict, b: dict) -> list[str]:
    """Names of the parts that differ between two fingerprints (empty: identical)."""
    bad = []
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray):
            same = x.shape == y.shape and (
                np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else np.array_equal(x, y)
            )
        else:
            same = x == y
        if not same:
            bad.append(key)
    return bad


def spot_check(store: str, paths: list[str], n: int = 5, seed: int = 1) -> int:
    """Compare a few frames of the store with their files; return how many were checked (raises if wrong)."""
    import zarr

    from photref_core.ingest.readers import read_frame

    group = zarr.open_group(store, mode="r")
    source_id = group["source_id"][:]
    frame_id = list(map(str, group["frame_id"][:]))
    col_of = {int(s): i for i, s in enumerate(source_id)}
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    for i in picks:
        frame = read_frame(paths[i])
        slot = frame_id.index(frame.header.frame_id)
        cols = np.array([col_of[int(s)] for s in frame.header.source_id])
        row_mag, row_err = group["mag"][slot], group["mag_err"][slot]
        ok = np.array_equal(row_mag[cols], frame.mag, equal_nan=True)
        ok &= np.array_equal(row_err[cols], frame.mag_err, equal_nan=True)
        others = np.ones(source_id.size, bool)
        others[cols] = False
        ok &= bool(np.isnan(row_mag[others]).all() and np.isnan(row_err[others]).all())
        if not ok:
            raise AssertionError(f"store row of {paths[i]} does not hold the file's values")
    return len(picks)


# --------------------------------------------------------------------------------------------------
# Prefect calibration
# --------------------------------------------------------------------------------------------------


def make_noop_flow():
    """A flow that submits ``n`` no-op tasks to the same bounded thread pool as the ingestion flow."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed

    from flows.runners import make_task_runner

    @task(name="bench-noop", cache_policy=NO_CACHE)
    def noop(i: int) -> int:
        return i

    @flow(name="bench-noop-flow", task_runner=make_task_runner(MAX_WORKERS))
    def noop_flow(n: int) -> int:
        futures = [noop.submit(i) for i in range(n)]
        return sum(f.result() for f in as_completed(futures))

    return noop_flow


def calibrate(n_tasks: int) -> dict:
    """Prefect's cost of one flow run with no task, and per task (best of a few runs: the machine is shared,
    and other users' load only ever adds time). The server's CPU is counted until it is idle again: it digests
    the task runs' events after the flow has returned, on the same cores."""
    from flows.runners import hand_run_settings

    noop_flow = make_noop_flow()
    start = time.perf_counter()
    noop_flow(1)
    warmup = time.perf_counter() - start

    def runs(n: int, repeats: int) -> tuple[float, float]:
        walls, server = [], []
        for _ in range(repeats):
            wait_for_quiet_server()
            srv0 = _server_cpu_seconds()
            start = time.perf_counter()
            noop_flow(n)
            walls.append(time.perf_counter() - start)
            wait_for_quiet_server()
            srv1 = _server_cpu_seconds()
            server.append(0.0 if srv0 is None or srv1 is None else srv1 - srv0)
        return min(walls), min(server)

    fixed, server_fixed = runs(0, 3)
    with_tasks, server_tasks = runs(n_tasks, 2)
    with hand_run_settings():  # the heartbeat off, as for runs started by hand
        no_heartbeat, _ = runs(0, 3)
    return {
        "warmup_s": warmup,
        "flow_fixed_s": fixed,
        "flow_fixed_no_heartbeat_s": no_heartbeat,
        "n_tasks": n_tasks,
        "with_tasks_s": with_tasks,
        "per_task_ms": max(0.0, 1e3 * (with_tasks - fixed) / n_tasks),  # noise can make it < 0
        "server_cpu_per_flow_s": server_fixed,
        "server_cpu_per_task_ms": max(0.0, 1e3 * (server_tasks - server_fixed) / n_tasks),
    }


# --------------------------------------------------------------------------------------------------
# Profile of the plain loop
# --------------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return wrapped


def profile_plain_loop(store: str, paths: list[str], shape: Shape, top: int = 25) -> None:
    """Where the serial plain loop spends its time: an instrumented breakdown, then cProfile's top list."""
    import zarr

    from photref_core.ingest import photometry as core
    from photref_core.ingest import readers as core_io
    from photref_core.store import frames as core_frames

    timers = {k: _Timer() for k in ("scan", "header", "read", "zget", "zset")}
    saved = (core_frames.scan_files, core.read_frame_header, zarr.Array.__getitem__, zarr.Array.__setitem__)
    core_frames.scan_files = timers["scan"].wrap(core_frames.scan_files)
    core.read_frame_header = timers["header"].wrap(core_io.read_frame_header)
    zarr.Array.__getitem__ = timers["zget"].wrap(saved[2])
    zarr.Array.__setitem__ = timers["zset"].wrap(saved[3])
    reader = timers["read"].wrap(core_io.read_frame)
    try:
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        plan = core.plan_ingestion(store, paths)
        t1 = time.perf_counter()
        z_plan = timers["zget"].seconds + timers["zset"].seconds
        results = []
        for batch in plan.batches:
            results.extend(core.ingest_batch(store, batch, reader=reader))
        t2 = time.perf_counter()
        z_batches = timers["zget"].seconds + timers["zset"].seconds - z_plan
        zset_batches = timers["zset"].seconds
        core.finalize_ingestion(store, results)
        t3 = time.perf_counter()
    finally:
        core_frames.scan_files, core.read_frame_header, zarr.Array.__getitem__, zarr.Array.__setitem__ = saved
    n = len(paths)
    total = t3 - t0
    scan, read = timers["scan"].seconds, timers["read"].seconds
    rows = [
        ["plan_ingestion", f"{t1 - t0:.2f}", f"{100 * (t1 - t0) / total:.0f}%", ""],
        [
            "  header pre-pass (_scan, 2 threads)",
            f"{scan:.2f}",
            f"{100 * scan / total:.0f}%",
            f"{1e3 * timers['header'].seconds / n:.2f} ms/frame per thread",
        ],
        ["  rest (axes, resize, frame metadata)", f"{t1 - t0 - scan:.2f}", "", ""],
        [f"ingest_batch x {len(plan.batches)}", f"{t2 - t1:.2f}", f"{100 * (t2 - t1) / total:.0f}%", ""],
        ["  read_frame", f"{read:.2f}", f"{100 * read / total:.0f}%", f"{1e3 * read / n:.2f} ms/frame"],
        [
            "  zarr reads + writes",
            f"{z_batches:.2f}",
            f"{100 * z_batches / total:.0f}%",
            f"writes {zset_batches:.2f} s",
        ],
        ["  rest (open store, scatter, checks)", f"{t2 - t1 - read - z_batches:.2f}", "", ""],
        ["finalize_ingestion", f"{t3 - t2:.2f}", f"{100 * (t3 - t2) / total:.0f}%", ""],
        ["total", f"{total:.2f}", "100%", f"{n / total:.0f} frames/s"],
    ]
    print_table(
        rows,
        ["part (serial plain loop, instrumented)", "s", "share", "note"],
        "lrrl",
        title=f"Breakdown of the plain loop, {shape.name}",
    )
    _codec_probe(store)

    shutil.rmtree(store, ignore_errors=True)
    prof = cProfile.Profile()
    prof.enable()
    plain_loop(store, paths, scan_workers=1)  # header pre-pass in this thread, so that cProfile sees it
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    print(
        f"\ncProfile of the serial plain loop, {shape.name}, header pre-pass serial too (top {top} by own "
        "time; the profiler slows Python-heavy code about 1.5x; zarr's codec work runs on zarr's own I/O "
        "thread, which cProfile does not see: there it shows as lock waits)"
    )
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000], flush=True)
    shutil.rmtree(store, ignore_errors=True)


def _read_fits_table_numpy(path: str):
    """Minimal FITS reader for the bench's own files (primary HDU + one plain BINTABLE, no heap/scaling):
    the header cards are parsed by hand and the rows viewed with ``np.frombuffer``. Only a probe of what a
    fast path in ``photref_core.ingest.readers`` could gain; it handles none of the cases astropy does."""
    with open(path, "rb") as f:
        buf = f.read()
    offset, header = 0, {}
    for hdu in range(2):
        header = {}
        done = False
        while not done:
            block = buf[offset : offset + 2880].decode("ascii")
            offset += 2880
            for i in range(0, 2880, 80):
                card = block[i : i + 80]
                key = card[:8].strip()
                if key == "END":
                    done = True
                    break
                if card[8:10] == "= ":
                    header[key] = card[10:].split("/")[0].strip().strip("'").strip()
        if hdu == 0:
            naxis = int(header.get("NAXIS", 0))
            assert naxis == 0, "primary HDU with data: not handled by the probe"
    codes = {"K": ">i8", "D": ">f8", "E": ">f4", "J": ">i4"}
    fields = []
    for i in range(1, int(header["TFIELDS"]) + 1):
        form = header[f"TFORM{i}"]
        repeat = int(form[:-1]) if len(form) > 1 else 1
        fields.append((header[f"TTYPE{i}"], codes[form[-1]], (repeat,) if repeat > 1 else ()))
    rows = np.frombuffer(buf, dtype=np.dtype(fields), count=int(header["NAXIS2"]), offset=offset)
    ids = rows["source_id"].astype(np.uint64)
    if ids.size != np.unique(ids).size:
        raise ValueError("duplicate ids")
    return header["FRAMEID"], ids, rows["mag"].astype(np.float64), rows["mag_err"].astype(np.float64)


def _fits_probe(paths: list[str], n: int = 200) -> None:
    """Time ``read_frame_header``/``read_frame`` (astropy) against the minimal numpy reader, same files."""
    from photref_core.ingest.readers import read_frame, read_frame_header

    sample = paths[:n]
    rows = []
    for label, fn in (
        ("photref_core.ingest.readers.read_frame_header", read_frame_header),
        ("photref_core.ingest.readers.read_frame", read_frame),
        ("numpy reader (header parse + frombuffer)", _read_fits_table_numpy),
    ):
        start = time.perf_counter()
        for path in sample:
            fn(path)
        rows.append([label, f"{1e3 * (time.perf_counter() - start) / len(sample):.3f}"])
    ref, fast = read_frame(sample[0]), _read_fits_table_numpy(sample[0])
    same = (
        ref.header.frame_id == fast[0]
        and np.array_equal(ref.header.source_id, fast[1])
        and np.array_equal(ref.mag, fast[2], equal_nan=True)
        and np.array_equal(ref.mag_err, fast[3], equal_nan=True)
    )
    print_table(
        rows,
        ["reader (one frame file)", "ms/frame"],
        "lr",
        title=f"Frame reading, mean of {len(sample)} frames (numpy reader gives identical arrays: {same})",
    )


def _codec_probe(store: str) -> None:
    """Write speed of one frame chunk of the store's ``mag`` with its codec and with two alternatives."""
    import zarr
    from zarr.codecs import BloscCodec

    group = zarr.open_group(store, mode="r")
    src = group["mag"]
    data = np.asarray(src[: src.chunks[0]])
    rows = []
    probe_dir = Path(store).parent / "codec-probe.zarr"
    choices = [
        ("store's codec: " + ", ".join(type(c).__name__ for c in src.compressors), "keep"),
        ("blosc lz4 + bitshuffle", [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=8)]),
        ("no compression", None),
    ]
    for label, compressors in choices:
        shutil.rmtree(probe_dir, ignore_errors=True)
        kwargs = {} if compressors == "keep" else {"compressors": compressors}
        if compressors == "keep":
            kwargs["compressors"] = src.compressors
        arr = zarr.create_array(
            probe_dir, shape=data.shape, chunks=src.chunks, dtype=src.dtype, fill_value=np.nan, **kwargs
        )
        times = []
        for _ in range(3):
            start = time.perf_counter()
            arr[:] = data
            times.append(time.perf_counter() - start)
        best = min(times)
        ratio = data.nbytes / max(dir_bytes(probe_dir), 1)
        rows.append([label, f"{1e3 * best:.1f}", f"{data.nbytes / 1e6 / best:.0f}", f"{ratio:.2f}"])
    shutil.rmtree(probe_dir, ignore_errors=True)
    print_table(
        rows,
        ["codec (one frame chunk of mag)", "write ms", "MB/s", "ratio"],
        "lrrr",
        title=f"zarr write of one frame chunk {data.shape} float64 ({data.nbytes / 1e6:.1f} MB)",
    )


# --------------------------------------------------------------------------------------------------
# One shape
# --------------------------------------------------------------------------------------------------


def run_shape(shape: Shape, workdir: Path, args) -> dict:
    print(f"\n=== {shape.name}: {shape} ===", flush=True)
    paths, nbytes, wrote_s = write_frames(workdir, shape, seed=args.seed)
    note = f"written in {wrote_s:.1f} s" if wrote_s else "reused from the cache"
    print(f"frame files: {len(paths):,} in {Path(paths[0]).parent} ({nbytes / 1e6:,.0f} MB, {note})")
    print(f"page cache warmed in {warm_page_cache(paths):.1f} s; load average {load_average()}", flush=True)
    n = len(paths)
    stores = workdir / "stores" / shape.name
    shutil.rmtree(stores, ignore_errors=True)
    stores.mkdir(parents=True)
    start = time.perf_counter()
    plain_loop(str(stores / "warm-up.zarr"), paths[:32])  # first-use costs of zarr, astropy, numpy
    shutil.rmtree(stores / "warm-up.zarr")
    print(
        f"core warm-up (32 frames into a scratch store, not timed): {time.perf_counter() - start:.2f} s; "
        f"each phase is run {shape.repeats} time(s), the best wall time is kept",
        flush=True,
    )
    phases: list[Phase] = []
    fingerprints = {}
    store_sizes = {}

    def run_phase(name: str, fn, check, store: str | None, fresh: bool = True, keep: bool = False) -> Phase:
        """Run a phase ``shape.repeats`` times (into a fresh store when ``fresh``); keep the fastest run."""
        best = None
        walls = []
        for _ in range(shape.repeats):
            if fresh and store is not None:
                shutil.rmtree(store, ignore_errors=True)
            phase, summary = measure(name, fn, n, nbytes)
            check(summary)
            phase.extra["batches"] = summary.get("batches")
            walls.append(phase.wall_s)
            if best is None or phase.wall_s < best.wall_s:
                best = phase
        best.extra["walls"] = walls
        phases.append(best)
        server = "" if best.server_cpu_s is None else f", server CPU {best.server_cpu_s:.1f} s"
        spread = f" (runs: {', '.join(f'{w:.2f}' for w in walls)})" if len(walls) > 1 else ""
        print(
            f"  {name:18s} {best.wall_s:7.2f} s  {best.frames_per_s:7.0f} frames/s  "
            f"{best.mb_per_s:7.1f} MB/s  peak RSS {best.peak_rss_mib:6.0f} MiB (+{best.rss_growth_mib:.0f})  "
            f"CPU {best.cpu_s:.1f} s{server}  [load {os.getloadavg()[0]:.2f}]{spread}",
            flush=True,
        )
        if store is not None and not keep:
            fingerprints[name] = store_fingerprint(store)
            store_sizes[name] = dir_bytes(store)
            if not args.keep_stores:
                shutil.rmtree(store)
        return best

    def ingested_all(summary):
        assert summary["ingested_now"] == n and summary["quarantined_now"] == 0, summary

    def skipped_all(summary):
        assert summary["ingested_now"] == 0 and summary["skipped"] == n, summary

    for name, workers in (("plain serial", 1), ("plain 2 threads", MAX_WORKERS)):
        store = str(stores / f"{name.replace(' ', '-')}.zarr")
        run_phase(name, lambda s=store, w=workers: plain_loop(s, paths, w), ingested_all, store)

    flow_store = str(stores / "flow.zarr")
    run_phase("flow", lambda: flow_run(flow_store, paths), ingested_all, flow_store, keep=True)
    run_phase("flow re-run", lambda: flow_run(flow_store, paths), skipped_all, None)
    checked = spot_check(flow_store, paths)
    fingerprints["flow"] = store_fingerprint(flow_store)
    store_sizes["flow"] = dir_bytes(flow_store)
    if not args.keep_stores:
        shutil.rmtree(flow_store)
    if shape.heartbeat_phase and not args.no_heartbeat_phase:
        store = str(stores / "flow-object.zarr")
        run_phase("flow object", lambda: flow_run(store, paths, flow_object=True), ingested_all, store)

    # --- correctness -------------------------------------------------------------------------------
    ref = fingerprints["plain serial"]
    problems = {k: fingerprints_equal(ref, fp) for k, fp in fingerprints.items() if k != "plain serial"}
    states_ok = all(bool((fp["frame_state"] == 1).all()) for fp in fingerprints.values())
    ok = states_ok and not any(problems.values()) and ref["shape"] == (n, shape.stars, shape.photometries)
    same = "identical" if not any(problems.values()) else f"NOT identical: {problems}"
    print(
        f"  correctness: {'OK' if ok else 'FAILED'}: the stores of {', '.join(fingerprints)} are "
        f"{same} (mag, mag_err, axes); every frame ingested: {states_ok}; {checked} frames match their "
        f"files; store {store_sizes['flow'] / 1e6:,.0f} MB on disk",
        flush=True,
    )
    if args.profile and (shape.profile or args.profile_all):
        profile_plain_loop(str(stores / "profile.zarr"), paths, shape)
        _fits_probe(paths)
    if not args.keep_stores:
        shutil.rmtree(stores, ignore_errors=True)
    return {"shape": shape, "bytes": nbytes, "phases": phases, "ok": ok, "store_bytes": store_sizes["flow"]}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "bench-output",
        help="cache of frame files, stores and PREFECT_HOME (default: bench-output/ in the repo)",
    )
    p.add_argument("--large-frames", type=int, default=2000, help="frames of the large shape (default 2000)")
    p.add_argument("--large-stars", type=int, default=20000, help="stars of the large shape (default 20000)")
    p.add_argument("--large-photometries", type=int, default=4, help="photometries of the large shape")
    p.add_argument("--skip-large", action="store_true", help="only the 'big' shape")
    p.add_argument("--quick", action="store_true", help="small smoke run: 64 x 300 x 7 and 48 x 2000 x 4")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also break the serial plain loop of the 'big' shape down (instrumented, then cProfile)",
    )
    p.add_argument("--profile-all", action="store_true", help="with --profile: profile every shape")
    p.add_argument(
        "--big-repeats",
        type=int,
        default=3,
        help="runs of every phase of the 'big' shape; the fastest counts (default 3: the machine is shared)",
    )
    p.add_argument("--large-repeats", type=int, default=1, help="runs of every phase of the large shape")
    p.add_argument(
        "--no-heartbeat-phase",
        action="store_true",
        help="skip the extra run of the 'big' shape calling the flow object (Prefect's heartbeat on)",
    )
    p.add_argument("--keep-stores", action="store_true", help="keep the stores (several GB for 'large')")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Before Prefect is imported (flows.* import it): a private home, no analytics, quiet logs.
    os.environ["PREFECT_HOME"] = str(workdir / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"

    if args.quick:
        shapes = [
            Shape("big (quick)", 64, 300, 7, heartbeat_phase=True, profile=True),
            Shape("large (quick)", 48, 2000, 4),
        ]
    else:
        big = Shape("big", 1120, 896, 7, TARGET_BIG_SECONDS, args.big_repeats, True, True)
        shapes = [big]
        if not args.skip_large:
            large = Shape("large", args.large_frames, args.large_stars, args.large_photometries)
            large.repeats = args.large_repeats
            shapes.append(large)

    import astropy
    import prefect
    import zarr

    started = time.perf_counter()
    print("photref ingestion benchmark (bench/ingest.py)")
    print(f"machine: {machine_description()}")
    print(
        f"versions: numpy {np.__version__}, zarr {zarr.__version__}, astropy {astropy.__version__}, "
        f"prefect {prefect.__version__}"
    )
    print(f"load average at start: {load_average()}")
    print(f"workdir: {workdir}; shapes: " + "; ".join(f"{s.name} = {s}" for s in shapes), flush=True)

    external = os.environ.get("PREFECT_API_URL")
    if external:
        harness = nullcontext()
    else:
        from prefect.testing.utilities import prefect_test_harness

        harness = prefect_test_harness(server_startup_timeout=120)
    start = time.perf_counter()
    with harness:
        server_s = time.perf_counter() - start
        where = (
            f"existing server {external}"
            if external
            else f"temporary local server started in {server_s:.1f} s"
        )
        print(f"Prefect server: {where} (not in any timing)", flush=True)
        n_tasks = 16 if args.quick else 128
        cal = calibrate(n_tasks)
        print(
            f"Prefect calibration (no-op tasks, ThreadPoolTaskRunner({MAX_WORKERS})): first flow run "
            f"{cal['warmup_s']:.2f} s (warm-up, not timed below); a flow run with no task "
            f"{cal['flow_fixed_s']:.2f} s; with {n_tasks} no-op tasks {cal['with_tasks_s']:.2f} s = "
            f"{cal['per_task_ms']:.1f} ms per task in the flow; a flow run with no task and the flow-run "
            f"heartbeat off {cal['flow_fixed_no_heartbeat_s']:.2f} s; Prefect server CPU: "
            f"{cal['server_cpu_per_flow_s']:.2f} s per flow run + {cal['server_cpu_per_task_ms']:.1f} ms per "
            "task (spent while and after the flow runs, on the same cores)",
            flush=True,
        )
        results = [run_shape(shape, workdir, args) for shape in shapes]

    # --- summary -----------------------------------------------------------------------------------
    rows = []
    for res in results:
        shape, phases = res["shape"], {p.name: p for p in res["phases"]}
        plain = phases["plain serial"]
        for p in res["phases"]:
            rows.append(
                [
                    shape.name,
                    p.name,
                    f"{p.wall_s:.2f}",
                    f"{p.frames_per_s:,.0f}",
                    f"{p.mb_per_s:,.1f}",
                    f"{p.peak_rss_mib:,.0f}",
                    f"{p.cpu_s:.1f}",
                    "" if p.server_cpu_s is None else f"{p.server_cpu_s:.1f}",
                    f"{p.wall_s / plain.wall_s:.2f}x",
                ]
            )
    print_table(
        rows,
        ["shape", "phase", "wall s", "frames/s", "MB/s", "peak RSS MiB", "CPU s", "server CPU s", "vs plain"],
        "llrrrrrrr",
        title="Summary (MB/s: bytes of the frame files / wall time; peak RSS: this process during the phase)",
    )
    rows = []
    for res in results:
        shape, phases = res["shape"], {p.name: p for p in res["phases"]}
        flow, plain, threads, rerun = (
            phases["flow"],
            phases["plain serial"],
            phases["plain 2 threads"],
            phases["flow re-run"],
        )
        direct = phases.get("flow object")
        batches = plain.extra["batches"]
        overhead = flow.wall_s / plain.wall_s
        target = shape.target_s
        rows.append(
            [
                str(shape.name),
                f"{shape.frames}x{shape.stars}x{shape.photometries}",
                f"{res['bytes'] / 1e6:,.0f}",
                f"{flow.wall_s:.2f}",
                (f"< {target:.0f} s: {'met' if flow.wall_s < target else 'MISSED'}" if target else "-"),
                f"{overhead:.2f}x: {'met' if overhead < TARGET_OVERHEAD else 'MISSED'}",
                f"{flow.wall_s / threads.wall_s:.2f}x",
                f"{flow.wall_s - threads.wall_s:+.2f} s ({batches + 2} tasks)",
                f"{rerun.wall_s:.2f} s = {100 * rerun.wall_s / flow.wall_s:.0f}%",
                f"{direct.wall_s:.2f} s = {direct.wall_s / plain.wall_s:.2f}x" if direct else "-",
                "OK" if res["ok"] else "FAILED",
            ]
        )
    print_table(
        rows,
        [
            "shape",
            "F x S x P",
            "MB in",
            "flow s",
            "target",
            f"flow/plain (< {TARGET_OVERHEAD}x)",
            "flow/2 threads",
            "flow - 2 threads",
            "re-run",
            "flow object (heartbeat), /plain",
            "check",
        ],
        "llrrllrllll",
        title="Against the targets",
    )
    print(
        f"\nprocess peak RSS (ru_maxrss, whole run): {ru_maxrss_mib():,.0f} MiB; "
        f"frame cache {dir_bytes(workdir) / 1e9:.2f} GB under {workdir}; "
        f"load average at the end: {load_average()}; total run time {time.perf_counter() - started:.0f} s"
    )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
