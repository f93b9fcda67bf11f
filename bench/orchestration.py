"""Benchmark of the orchestration: Prefect flows against the same photref_core calls in a plain loop, and
the fully cached re-run, on many small frames (where Prefect's per-run and per-task costs show most), on a
Prefect server with SQLite and then with PostgreSQL.

What is measured
----------------
For each server database (``--backends``, default SQLite then PostgreSQL) and each size (default 1,000
and 10,000 frames; ``--quick``: 100), frames of 50 stars x 2 photometries, in this order, each phase on
fresh stores:

1. ``plain ingest``: ``photref_core.ingest.photometry.plan_ingestion``, ``ingest_batch`` for every batch
   one after the other, ``finalize_ingestion`` (no Prefect), with the flow's default chunking
   (``frames_per_chunk_for``: 64 frames a chunk for frames this small);
2. ``plain master``: ``photref_core.master.steps.build_master`` on that store (fit-terms check, statistics,
   scatter fit, master, statistics table and plots), what the master flow runs minus Prefect;
3. ``ingest flow``: ``flows.ingest.run_ingest(..., max_workers=2)`` into a new store (plan task, one task
   per frame chunk on a 2-thread ``ThreadPoolTaskRunner``, finalise task, progress and summary
   artifacts);
4. ``master flow``: ``flows.master_photref.run_master(..., max_workers=2)`` on that store, no frames
   given (validation, statistics, fit, products tasks, cache-key computation, artifacts with the plots
   inlined);
5. ``cached re-run``: ``run_master`` again, now with the frames (the glob): the read-only check finds no
   new or changed frame (same path, mtime and size), so the ingestion subflow is left out, and the
   statistics, fit and products tasks are served from Prefect's cache (5 times, 0.5 s apart, median; see
   "Re-runs" below). Its time is compared with the first run, ``ingest flow + master flow`` (target: under
   5 %); the task states read back from the Prefect server prove that nothing ran again.
   ``run_ingest``/``run_master`` are the entry points of runs started by hand, which run without
   Prefect's flow-run heartbeat (``flows/runners.py`` says why);
6. ``back-to-back re-run``: 20 of the same re-runs with no pause between them (median and max; printed,
   not the target), and the number of times Prefect's client backed off meanwhile (:class:`BackoffCounter`:
   the client's "Another attempt will be made in 2s" records);
7. ``re-run, flow object``: the same re-run calling the flow object ``build_master_photref`` directly,
   i.e. with Prefect's default flow-run heartbeat: Prefect 3.8.8 joins its heartbeat thread, which sleeps
   in 1 s steps, at the end of every flow run, so such a run costs up to 1-2 s however little it does;
8. ``empty flow run``: a flow with no task and no artifact, run by hand (median of 5, 0.5 s apart):
   Prefect's own floor for one flow run on this server.

Re-runs
-------
A flow run that starts within a few tens of ms of the previous one's end, on Prefect's SQLite server,
usually meets "database is locked": the server is still recording the previous run's events when the new
run's ``create_flow_run`` (a read then a write in one deferred transaction) comes in, answers 503, and
Prefect's client backs off 2 s (measured here: 0 of 36 re-runs stalled with 50 ms to 1 s between runs, 5
of 6 back to back, one of them for 60 s). A nightly or hand-started re-run comes minutes apart, so the
target phase waits 0.5 s (untimed) before each re-run; the back-to-back phase shows the stall as it is.
PostgreSQL (``photref server start --postgres``, the deployments README's production set-up) has no
such lock: the back-to-back phase shows both.

Every phase gets the same glob of the frame files (the flows expand it; the plain loop expands it too,
inside the timing). Wall time is ``time.perf_counter`` around the call. The masters of the plain loop and
of the flows are compared (every table HDU's data); they must be identical.

Not timed: writing the frame files (once, cached in ``<workdir>/frames-<N>x50x2``; each file written with
``astropy.io.fits`` directly: int64 ``source_id``, float64 ``mag``/``mag_err`` of shape (50, 2), FRAMEID and
JD in the table header, rows in random order, 1 % NaN), the Prefect server start (printed), and one warm-up
flow run per flow on 3 frames (client and engine set-up). The page cache is warm (the frames were just
written or read).

On what
-------
A shared 2-core, 24 GiB machine (other engineers' jobs run beside it: the 1/5/15-minute load averages of
``os.getloadavg()`` are printed before and after every size, and a load above 2 slows every figure), Python
3.11, Prefect 3.8.8. The Prefect server is ``photref server start --sqlite`` and then ``--postgres``
(a local PostgreSQL 15 cluster), each with its own ``PREFECT_HOME`` under the work directory and a port
of its own, started before any timing (printed), this process pointed at it with Prefect's
``temporary_settings``, its pending events and logs delivered before it is stopped (a second server on
the first one's port was sent the first one's task-run events). Analytics off, logging at WARNING; the
server runs in a subprocess on the same two cores (PostgreSQL too), so its CPU competes with the flows'.
The servers' output is ``<workdir>/prefect-home-<database>/server.log``.

Usage::

    .venv/bin/python bench/orchestration.py            # 1,000 and 10,000 frames, SQLite then PostgreSQL
                                                       # (~6 min here; writing the 10,000 frames ~20 s)
    .venv/bin/python bench/orchestration.py --quick    # 100 frames: a smoke run (about 30 s)
    .venv/bin/python bench/orchestration.py --sizes 2000 --backends postgres --keep
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STARS = 50
PHOTOMETRIES = 2
GAIA_ID_BASE = 4_295_806_720_000_000_000
TARGET_RERUN_FRACTION = 0.05
RERUNS = 5
PAUSE_S = 0.5  # untimed, before each re-run (see "Re-runs" in the docstring)
BACK_TO_BACK = 20  # cached re-runs with no pause between them
BACKENDS = ("sqlite", "postgres")
GENERATOR_VERSION = 1


class BackoffCounter(logging.Handler):
    """Counts Prefect's client back-offs while in use: every answer it retries (503 "database is locked"
    from a SQLite server among them) is one ``prefect.client`` debug record, "Received response with
    retryable status code 503. Another attempt will be made in 2s" (``prefect/client/base.py``, 3.8.8).

    Use as a context manager; ``backoffs`` holds the records' messages. The client's debug records are
    kept off the console meanwhile."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.backoffs: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Another attempt will be made" in message:
            self.backoffs.append(message)

    def __enter__(self) -> BackoffCounter:
        self._logger = logging.getLogger("prefect.client")
        self._saved = (self._logger.level, self._logger.propagate)
        self._logger.setLevel(logging.DEBUG)
        self._logger.propagate = False
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]


def _setup_environment(workdir: Path) -> None:
    """Prefect's settings, before Prefect is imported anywhere."""
    os.environ["PREFECT_HOME"] = str(workdir / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.pop("PREFECT_API_URL", None)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min, {os.cpu_count()} cores)"


def machine() -> str:
    import psutil

    memory = psutil.virtual_memory().total / 2**30
    system = f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores, {memory:.1f} GiB RAM, {system}"


# --------------------------------------------------------------------------------------------------
# Frame files
# --------------------------------------------------------------------------------------------------


def write_frames(workdir: Path, n_frames: int, seed: int = 0) -> tuple[Path, Path]:
    """Write (or reuse) ``n_frames`` frame files and their catalog; returns (frame directory, catalog)."""
    from astropy.io import fits
    from astropy.table import Table

    directory = workdir / f"frames-{n_frames}x{STARS}x{PHOTOMETRIES}"
    catalog = directory / "catalog.fits"
    stamp = directory / f".complete-v{GENERATOR_VERSION}-s{seed}"
    if stamp.exists():
        return directory, catalog
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = GAIA_ID_BASE + np.sort(rng.choice(10**15, size=STARS, replace=False)).astype(np.uint64)
    g_mag = rng.uniform(9.0, 15.0, STARS)
    Table({"source_id": ids, "phot_g_mean_mag": g_mag, "bp_rp": rng.normal(0.9, 0.3, STARS)}).write(catalog)
    sigma = 0.003 + 0.01 * 10 ** (0.4 * (g_mag - 14.0))

    columns = [
        fits.Column(name="source_id", format="K", array=np.zeros(STARS, np.int64)),
        fits.Column(name="mag", format=f"{PHOTOMETRIES}D", array=np.zeros((STARS, PHOTOMETRIES))),
        fits.Column(name="mag_err", format=f"{PHOTOMETRIES}D", array=np.zeros((STARS, PHOTOMETRIES))),
    ]
    hdu = fits.BinTableHDU.from_columns(columns)
    primary = fits.PrimaryHDU()
    jd = 2460400.5 + np.sort(rng.uniform(0, 60, n_frames))
    for k in range(n_frames):
        order = rng.permutation(STARS)
        mag = (
            g_mag[order, None]
            + 0.1 * np.arange(PHOTOMETRIES)
            + rng.normal(0, 1, (STARS, PHOTOMETRIES)) * sigma[order, None]
        )
        mag[rng.random(mag.shape) < 0.01] = np.nan
        hdu.data["source_id"] = ids[order].astype(np.int64)  # Gaia ids < 2**63: exact as int64
        hdu.data["mag"] = mag
        hdu.data["mag_err"] = np.repeat(sigma[order, None], PHOTOMETRIES, axis=1)
        frame_id = f"f{k:06d}"
        hdu.header["FRAMEID"] = frame_id
        hdu.header["JD"] = float(jd[k])
        fits.HDUList([primary, hdu]).writeto(directory / f"{frame_id}.fits", overwrite=True)
    stamp.touch()
    return directory, catalog


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


def plain_ingest(store: Path, pattern: str, catalog: Path) -> dict:
    import glob

    from photref_core.catalog import read_catalog
    from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion

    frames = sorted(glob.glob(pattern))
    plan = plan_ingestion(store, frames, catalog=read_catalog(catalog))
    results = [r for batch in plan.batches for r in ingest_batch(store, batch)]
    return finalize_ingestion(store, results)


def plain_master(store: Path, catalog: Path, output: Path) -> dict:
    from photref_core.master.steps import build_master

    return build_master(store, catalog, output)


def flow_states(state) -> dict[str, list[str]]:
    """{state name: task run names} of a flow run (subflows included), read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    root = state.state_details.flow_run_id

    async def read():
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root]))
            )
            ids = [root] + [c.id for c in children]
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        names: dict[str, list[str]] = {}
        for run in runs:
            names.setdefault(run.state.name, []).append(run.name.split(" ")[0])
        return names

    return asyncio.run(read())


def same_masters(a: Path, b: Path) -> bool:
    from astropy.io import fits

    with fits.open(a) as x, fits.open(b) as y:
        if [h.name for h in x] != [h.name for h in y]:
            return False
        for u, v in zip(x, y, strict=True):
            if isinstance(u, fits.BinTableHDU):
                for name in u.columns.names:
                    a, b = np.asarray(u.data[name]), np.asarray(v.data[name])
                    if not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                        return False
    return True


def timed(call, *args, **kwargs):
    start = time.perf_counter()
    result = call(*args, **kwargs)
    return time.perf_counter() - start, result


def run_size(workdir: Path, n_frames: int, keep: bool) -> dict:
    from prefect import flow

    from flows.ingest import run_ingest
    from flows.master_photref import build_master_photref, run_master
    from flows.runners import make_task_runner, run_by_hand

    start = time.perf_counter()
    frames_dir, catalog = write_frames(workdir, n_frames)
    write_s = time.perf_counter() - start
    pattern = str(frames_dir / "f*.fits")
    size_mb = sum(p.stat().st_size for p in frames_dir.glob("f*.fits")) / 1e6
    print(
        f"\n== {n_frames:,} frames x {STARS} stars x {PHOTOMETRIES} photometries ({size_mb:.1f} MB of files; "
        f"written or checked in {write_s:.1f} s) =="
    )
    print(f"   before: {load_average()}", flush=True)
    stores = workdir / "stores" / str(n_frames)
    shutil.rmtree(stores, ignore_errors=True)
    stores.mkdir(parents=True)

    figures: dict[str, float] = {}
    figures["plain ingest"], summary = timed(plain_ingest, stores / "plain.zarr", pattern, catalog)
    assert summary["frames_ingested_total"] == n_frames, summary
    figures["plain master"], _ = timed(
        plain_master, stores / "plain.zarr", catalog, stores / "plain" / "master.fits"
    )

    figures["ingest flow"], summary = timed(
        run_ingest, stores / "flow.zarr", [pattern], catalog=catalog, max_workers=2
    )
    assert summary["ingested_now"] == n_frames, summary
    output = stores / "flow" / "master.fits"
    arguments = {"store": str(stores / "flow.zarr"), "catalog": str(catalog), "output": str(output)}
    figures["master flow"], _ = timed(run_master, **arguments, max_workers=2)

    def median_of(call, pause=PAUSE_S, **kwargs) -> tuple[list[float], object]:
        times, state = [], None
        for _ in range(RERUNS):
            time.sleep(pause)
            seconds, state = timed(call, **kwargs)
            times.append(seconds)
        return times, state

    reruns, state = median_of(run_master, **arguments, frames=[pattern], max_workers=2, return_state=True)
    with BackoffCounter() as counter:
        back_to_back = [
            timed(run_master, **arguments, frames=[pattern], max_workers=2)[0] for _ in range(BACK_TO_BACK)
        ]
    flow_object = build_master_photref.with_options(task_runner=make_task_runner(2))
    direct, _ = median_of(flow_object, **arguments, frames=[pattern])

    @flow(name="empty")
    def empty() -> None:
        return None

    floor, _ = median_of(run_by_hand, flow=empty)
    figures["cached re-run"] = float(np.median(reruns))
    figures["back-to-back re-run"] = float(np.median(back_to_back))
    figures["back-to-back max"] = float(np.max(back_to_back))
    figures["back-offs"] = len(counter.backoffs)
    figures["re-run, flow object"] = float(np.median(direct))
    figures["empty flow run"] = float(np.median(floor))
    states = flow_states(state)
    identical = same_masters(stores / "plain" / "master.fits", output)
    ran = "; ".join(f"{state}: {', '.join(sorted(names))}" for state, names in sorted(states.items()))
    print(f"   after:  {load_average()}")
    print(
        f"   cached re-runs (run_master, {PAUSE_S} s apart): {', '.join(f'{t:.2f}' for t in reruns)} s; "
        f"{BACK_TO_BACK} back to back: {', '.join(f'{t:.2f}' for t in back_to_back)} s "
        f"({len(counter.backoffs)} client back-off(s)); calling the flow object "
        f"(Prefect's heartbeat on): {', '.join(f'{t:.2f}' for t in direct)} s; an empty flow run: "
        f"{', '.join(f'{t:.2f}' for t in floor)} s (medians in the table; a run near 2 s met the SQLite "
        "server's 'database is locked' and Prefect's client backed off 2 s)\n"
        f"   cached re-run, task runs by final state: {ran}\n"
        f"   masters of the plain loop and of the flows identical: {identical}",
        flush=True,
    )
    if not keep:
        shutil.rmtree(stores, ignore_errors=True)
    return {"frames": n_frames, "figures": figures, "states": states, "identical": identical}


def warm_up(workdir: Path) -> None:
    """One small run of each flow: client, engine and server set-up, outside every timing."""
    from flows.ingest import run_ingest
    from flows.master_photref import run_master

    frames_dir, catalog = write_frames(workdir, 3, seed=1)
    scratch = workdir / "stores" / "warm-up"
    shutil.rmtree(scratch, ignore_errors=True)
    run_ingest(scratch / "s.zarr", [str(frames_dir / "f*.fits")], catalog=catalog, max_workers=2)
    run_master(scratch / "s.zarr", catalog, scratch / "master.fits", max_workers=2, plots=False)
    shutil.rmtree(scratch, ignore_errors=True)


def print_summary(results: list[dict]) -> None:
    rows = []
    for r in results:
        f = r["figures"]
        first = f["ingest flow"] + f["master flow"]
        rows.append(
            [
                r["backend"],
                f"{r['frames']:,}",
                f"{f['plain ingest']:.2f}",
                f"{f['ingest flow']:.2f}",
                f"{f['ingest flow'] / f['plain ingest']:.2f}x",
                f"{1000 * (f['ingest flow'] - f['plain ingest']) / r['frames']:.2f}",
                f"{f['plain master']:.2f}",
                f"{f['master flow']:.2f}",
                f"{f['master flow'] / f['plain master']:.2f}x",
                f"{f['cached re-run']:.2f}",
                f"{100 * f['cached re-run'] / first:.1f} %",
                "yes" if f["cached re-run"] / first < TARGET_RERUN_FRACTION else "no",
                f"{f['back-to-back re-run']:.2f} / {f['back-to-back max']:.2f}",
                str(f["back-offs"]),
                f"{f['re-run, flow object']:.2f}",
                f"{100 * f['re-run, flow object'] / first:.1f} %",
                f"{f['empty flow run']:.2f}",
            ]
        )
    headers = [
        "database",
        "frames",
        "plain ingest s",
        "ingest flow s",
        "flow/plain",
        "extra ms/frame",
        "plain master s",
        "master flow s",
        "flow/plain",
        "cached re-run s",
        "re-run/first run",
        "< 5 %",
        "back to back s (median / max)",
        "back-offs",
        "flow object s",
        "/first run",
        "empty flow s",
    ]
    cells = [headers] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(
        "\nSummary (wall seconds; first run = ingest flow + master flow; cached re-runs: medians of "
        f"{RERUNS}, {PAUSE_S} s apart, through run_master; {BACK_TO_BACK} back to back, and the client's "
        "back-offs among them; calling the flow object (Prefect's default heartbeat))"
    )
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


@contextlib.contextmanager
def photref_server(workdir: Path, backend: str):
    """``photref server start`` on ``backend`` (its own Prefect home under the work directory), as this
    process's API for the duration; stopped (the server and its PostgreSQL cluster) at the end."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import server
    from flows._ports import free_port

    home = workdir / f"prefect-home-{backend}"
    own_home = os.environ["PREFECT_HOME"]
    os.environ["PREFECT_HOME"] = str(home)  # flows.server reads it per call
    try:
        server.stop_server()  # a server a killed bench left behind
        start = time.perf_counter()
        # A port of its own: this process's Prefect clients (the events worker above all) keep sending to
        # the address they know, and a second server on the first one's port was sent the first one's
        # task-run events (on PostgreSQL: thousands of foreign-key errors, and the run's own task runs
        # queued behind them).
        url = server.start_server(port=free_port(), backend=backend, timeout=180)
        print(
            f"\n##### {backend}: photref server start --{backend} in {time.perf_counter() - start:.1f} s "
            f"(not timed below): {server.running_database()}",
            flush=True,
        )
    finally:
        os.environ["PREFECT_HOME"] = own_home
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            _drain_prefect_clients()
    finally:
        os.environ["PREFECT_HOME"] = str(home)
        try:
            server.stop_server()
        finally:
            os.environ["PREFECT_HOME"] = own_home


def _drain_prefect_clients() -> None:
    """Deliver this process's pending events and logs to the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=60, at_exit=False)
    APILogWorker.drain_all(timeout=60, at_exit=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 100-frame size: a smoke run")
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated frame counts")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="the server's databases, one after the other"
    )
    parser.add_argument("--workdir", default=str(REPO / "bench-output" / "orchestration"))
    parser.add_argument("--keep", action="store_true", help="keep the stores and masters")
    args = parser.parse_args(argv)
    sizes = [100] if args.quick else [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _setup_environment(workdir)

    print(f"bench/orchestration.py: {machine()}")
    print(f"work directory {workdir}; {load_average()}", flush=True)
    results = []
    for backend in backends:
        with photref_server(workdir, backend):
            warm_up(workdir)
            for n in sizes:
                results.append(run_size(workdir, n, args.keep) | {"backend": backend})
    print_summary(results)
    if not all(r["identical"] for r in results):
        print("ERROR: the flows' master differs from the plain loop's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
