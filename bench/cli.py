"""Benchmark: photref as a user runs it (the ``photref`` commands as processes) against AutoWISP 2.3.0 itself,
on the same frame files, in one run.

Phases, one after the other on the same frames (simulated once per shape with every value finite, reused
from ``<workdir>/field-FxSxP``), after one untimed command that creates the bench's Prefect database:

(b) **processes, temporary server**: ``photref ingest STORE 'frames/*.fits' --catalog CAT`` into a fresh
    store, ``photref master STORE --catalog CAT --output master.fits``, the same ``photref master`` again
    (cached: nothing changed), the same ``photref ingest`` again (a no-op: every frame unchanged), and
    ``photref master STORE2 ... --frames 'frames/*.fits'`` into another fresh store (one command that
    ingests and builds, as a nightly schedule runs it), each a process timed from outside, with no server
    running (each process starts and stops Prefect's temporary server, as a user without ``photref server
    start`` has it);
(c) **processes, running server**: ``photref server start`` (timed apart), then the same five commands;
    the master run's task runs are read back from the server, so the master process's time is split into
    statistics, scatter fit, writing the products and the rest (process start, imports, Prefect);
(d) **in process**: ``run_ingest``, ``run_master``, ``run_master`` (cached), ``run_ingest`` (no-op),
    ``run_master(..., frames=)`` in one Python process on the running server, timed inside it (the first
    call pays the imports; 0.5 s untimed between runs, see :data:`IN_PROCESS_PAUSE_S`);
(a) **AutoWISP 2.3.0**: ``bench/peers/autowisp_master.py`` run by the python of AutoWISP's own environment
    (``bench/peers/autowisp/``, made on first use by ``bench/peers/autowisp_env.py``), as one process timed
    from outside, with its phases (import, reading the frames, ``add_input`` per frame, ``generate_master``)
    from inside. Both tools get the same parameters: photref's master defaults (``MASTER_DEFAULTS``),
    passed to AutoWISP under its names. The driver then reads photref's master with AutoWISP's own
    ``get_master_photref`` and compares the two masters star by star.

Printed: each phase; AutoWISP's process time over photref's ingest + master, and over the one command, for
(b), (c) and (d); the targets of the issue (>= 100x with a running server on the full shape; a cached
``photref master`` under 2 s with the server, under 8 s without); whether every photref master (two a mode)
holds the same tables. The figures go to ``<workdir>/results-<shape>.json`` too.

Shapes: ``--quick`` (default) 301 frames x 1,500 stars x 5 photometries (AutoWISP ~3 min here);
``--full`` AutoWISP's big shape, 1,120 x 896 x 7 (AutoWISP ~15 min here: run it once, in the background);
``--shape FxSxP`` any other. ``--no-autowisp`` runs photref's half only (what the test suite runs, on a tiny
shape, so that this script cannot rot).

Run: ``.venv/bin/python bench/cli.py [--quick|--full|--shape FxSxP] [--no-autowisp] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from bench._common import REPO, load_average, machine_description, print_table
except ModuleNotFoundError:  # run as ``python bench/cli.py``: bench/ is on sys.path, not the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench._common import REPO, load_average, machine_description, print_table

PHOTREF = str(Path(sys.executable).with_name("photref"))
DRIVER = REPO / "bench" / "peers" / "autowisp_master.py"
TARGET_RATIO_WITH_SERVER = 100.0
TARGET_CACHED_WITH_SERVER_S = 2.0
TARGET_CACHED_TEMPORARY_S = 8.0
TEMPORARY, SERVER, IN_PROCESS = "processes, temporary server", "processes, running server", "in process"
STEPS = ("ingest", "master", "cached master", "no-op ingest", "master --frames")
#: Seconds between two in-process flow runs (untimed): a run started within ~50 ms of the previous one's end
#: meets "database is locked" on Prefect's SQLite server and its client backs off 2 s (README, issue 31).
IN_PROCESS_PAUSE_S = 0.5


@dataclass(frozen=True)
class Shape:
    frames: int
    stars: int
    photometries: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        try:
            frames, stars, photometries = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--shape wants FRAMESxSTARSxPHOTOMETRIES, not {text!r}"
            ) from None
        return cls(frames, stars, photometries)

    @property
    def tag(self) -> str:
        return f"{self.frames}x{self.stars}x{self.photometries}"

    def __str__(self) -> str:
        return f"{self.frames:,} frames x {self.stars:,} stars x {self.photometries} photometries"


QUICK, FULL = Shape(301, 1500, 5), Shape(1120, 896, 7)


@dataclass(frozen=True)
class Field:
    frames: str  # a glob, as a user types it
    catalog: str


def simulated_field(shape: Shape, workdir: Path) -> Field:
    """The frames and catalog of ``shape``, simulated once (every value finite: AutoWISP's collector drops a
    star from a frame when any of its values is not), then reused."""
    directory = workdir / f"field-{shape.tag}"
    if not (directory / "done").exists():
        from photref_core.simulate.photometry import simulate_photometry

        shutil.rmtree(directory, ignore_errors=True)
        simulate_photometry(
            directory,
            frames=shape.frames,
            stars=shape.stars,
            photometries=shape.photometries,
            seed=3,
            lost_fraction=0.0,
            bad_error_fraction=0.0,
        )
        (directory / "done").write_text("")
    return Field(str(directory / "frames" / "*.fits"), str(directory / "catalog.fits"))


def photref_env(home: Path, api_url: str | None = None) -> dict:
    """The environment of this bench's photref processes: its own Prefect home, no analytics, and a server
    URL only where one is meant to be used (``photref`` finds a server started with the same home itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def timed_process(args: list[str], env: dict, log: Path) -> tuple[float, str]:
    """Wall seconds and stdout of one process; the bench stops, with the log's tail, when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    with log.open("a") as out:
        out.write(
            f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}# {elapsed:.2f} s, exit {proc.returncode}\n"
        )
    if proc.returncode:
        raise SystemExit(
            f"{' '.join(args)} failed (exit {proc.returncode}); log {log}:\n{proc.stderr[-3000:]}"
        )
    return elapsed, proc.stdout


def photref_processes(field: Field, work: Path, label: str, env: dict) -> tuple[dict, str | None]:
    """ingest + master into a fresh store, master again (cached), ingest again (no-op), each a process.

    Returns the seconds per step and the master run's flow-run id (from ``--json``)."""
    store, master = work / f"{label}.zarr", work / f"{label}-master.fits"
    shutil.rmtree(store, ignore_errors=True)
    log = work / f"{label}.log"
    log.unlink(missing_ok=True)
    ingest = [PHOTREF, "ingest", str(store), field.frames, "--catalog", field.catalog]
    build = [PHOTREF, "master", str(store), "--catalog", field.catalog, "--output", str(master), "--json"]
    seconds = {}
    seconds["ingest"], _ = timed_process(ingest, env, log)
    seconds["master"], out = timed_process(build, env, log)
    run_id = json.loads(out).get("flow_run_id")
    seconds["cached master"], out = timed_process(build, env, log)
    if not json.loads(out).get("cached"):
        raise SystemExit(f"the second `photref master` was not served from the cache; log {log}")
    seconds["no-op ingest"], _ = timed_process(ingest, env, log)
    # What a nightly schedule runs: one command that ingests the new frames and builds the master.
    one = work / f"{label}-one-command.zarr"
    shutil.rmtree(one, ignore_errors=True)
    one_master = str(work / f"{label}-one-command-master.fits")
    build_one = [PHOTREF, "master", str(one), "--catalog", field.catalog, "--output", one_master]
    seconds["master --frames"], _ = timed_process([*build_one, "--frames", field.frames], env, log)
    return seconds, run_id


def warm_up(field: Field, work: Path, env: dict) -> None:
    """One untimed command on the temporary server: it creates this bench's Prefect database (migrations,
    ~10 s, once per Prefect home: not what a user pays on every command)."""
    store = work / "warm-up.zarr"
    shutil.rmtree(store, ignore_errors=True)
    first_frame = sorted(Path(field.frames).parent.glob("*.fits"))[0]
    timed_process([PHOTREF, "ingest", str(store), str(first_frame)], env, work / "warm-up.log")
    shutil.rmtree(store, ignore_errors=True)


IN_PROCESS_SCRIPT = r"""
import json, sys, time
from flows.ingest import run_ingest
from flows.master_photref import run_master
store, frames, catalog, output, one_output, pause = sys.argv[1:7]
steps = {
    "ingest": lambda: run_ingest(store, [frames], catalog=catalog),
    "master": lambda: run_master(store, catalog, output),
    "cached master": lambda: run_master(store, catalog, output),
    "no-op ingest": lambda: run_ingest(store, [frames], catalog=catalog),
    "master --frames": lambda: run_master(store + "-one", catalog, one_output, frames=[frames]),
}
seconds = {}
for name, step in steps.items():
    time.sleep(float(pause))
    start = time.perf_counter()
    step()
    seconds[name] = time.perf_counter() - start
print("SECONDS " + json.dumps(seconds))
"""


def photref_in_process(field: Field, work: Path, env: dict) -> dict:
    """The same five steps as flows called in one process, timed inside it."""
    store, master = work / "in-process.zarr", work / "in-process-master.fits"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(f"{store}-one", ignore_errors=True)
    one_master = work / "in-process-one-command-master.fits"
    args = [sys.executable, "-c", IN_PROCESS_SCRIPT, str(store), field.frames, field.catalog, str(master)]
    args += [str(one_master), str(IN_PROCESS_PAUSE_S)]
    _, out = timed_process(args, env, work / "in-process.log")
    return json.loads(next(line for line in out.splitlines() if line.startswith("SECONDS "))[8:])


def task_runs(api_url: str, home: Path, flow_run_id: str) -> list:
    """The finished task runs of a flow run, read from the running server, in start order (Prefect's
    ``TaskRun`` objects: ``name`` as the UI shows it, ``start_time``, ``end_time``)."""
    os.environ |= photref_env(home, api_url)  # Prefect reads its settings when first imported
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted((r for r in runs if r.start_time and r.end_time), key=lambda r: r.start_time)


def task_seconds(api_url: str, home: Path, flow_run_id: str) -> dict[str, float]:
    """Seconds of each task run of a flow run, read from the running server (names as the UI shows them)."""
    runs = task_runs(api_url, home, flow_run_id)
    return {r.name: (r.end_time - r.start_time).total_seconds() for r in runs}


def master_tables_digest(path: Path) -> str:
    """SHA-256 of the master's MPHOTREF tables (the data, not the header's run-specific keywords)."""
    from astropy.io import fits

    digest = hashlib.sha256()
    with fits.open(path) as hdul:
        for hdu in hdul:
            if hdu.name == "MPHOTREF":
                digest.update(hdu.data.tobytes())
    return digest.hexdigest()


def autowisp_process(field: Field, work: Path, photref_master: Path) -> dict:
    """AutoWISP 2.3.0 on the same frames, as one process in its own environment; its figures."""
    from bench.peers.autowisp_env import ensure_autowisp_venv
    from photref_core.master.parameters import MASTER_DEFAULTS

    python = ensure_autowisp_venv(REPO)
    settings = {k: v for k, v in MASTER_DEFAULTS.items() if k != "scatter_quantity"}
    # generate_master() fits the median absolute deviation (medianmeddev) and has no option to change it.
    if MASTER_DEFAULTS["scatter_quantity"] != "medianmeddev":
        raise SystemExit("AutoWISP fits medianmeddev only; photref's default scatter quantity is another")
    args = [str(python), "-I", str(DRIVER), "--frames", field.frames, "--catalog", field.catalog]
    args += ["--output", str(work / "autowisp"), "--compare", str(photref_master)]
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PYTHON"))}
    wall, out = timed_process(args, env, work / "autowisp.log")
    return json.loads(out.strip().splitlines()[-1]) | {"process_s": wall}


MODES = {"temporary": TEMPORARY, "server": SERVER, "in-process": IN_PROCESS}


def run_shape(shape: Shape, workdir: Path, modes: list[str], autowisp: bool) -> dict:
    """Run the phases of ``modes`` (keys of :data:`MODES`) and, when asked, AutoWISP; the figures."""
    field = simulated_field(shape, workdir)
    work = workdir / f"runs-{shape.tag}"
    home = work / "prefect-home"
    subprocess.run([PHOTREF, "server", "stop"], env=photref_env(home), capture_output=True, cwd=REPO)
    # Nothing from an earlier run: its Prefect home holds cached task results (with the products still on
    # disk, a rebuilt store's master would be served from the cache and time nothing).
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {"shape": str(shape), "machine": machine_description(), "load_start": load_average()}

    warm_up(field, work, photref_env(home))
    if "temporary" in modes:
        print(f"\n{shape}: {TEMPORARY} ...", flush=True)
        results[TEMPORARY], _ = photref_processes(field, work, "temporary", photref_env(home))
    if "server" in modes or "in-process" in modes:
        start_cmd = [PHOTREF, "server", "start"]
        results["server start s"], _ = timed_process(start_cmd, photref_env(home), work / "server.log")
        try:
            api_url = json.loads((home / "photref-server.json").read_text())["api_url"]
            if "server" in modes:
                print(f"{shape}: {SERVER} ...", flush=True)
                results[SERVER], run_id = photref_processes(field, work, "server", photref_env(home))
                results["master tasks"] = task_seconds(api_url, home, run_id) if run_id else {}
            if "in-process" in modes:
                print(f"{shape}: {IN_PROCESS} ...", flush=True)
                results[IN_PROCESS] = photref_in_process(field, work, photref_env(home, api_url))
        finally:
            subprocess.run([PHOTREF, "server", "stop"], env=photref_env(home), capture_output=True, cwd=REPO)

    # Every master photref wrote: ingest + master, and the one command, per mode.
    masters = [work / f"{mode}{one}-master.fits" for mode in modes for one in ("", "-one-command")]
    results["photref masters identical"] = len({master_tables_digest(m) for m in masters}) == 1
    if autowisp:
        print(f"{shape}: AutoWISP 2.3.0 ...", flush=True)
        results["autowisp"] = autowisp_process(field, work, masters[0])
    results["load_end"] = load_average()
    (workdir / f"results-{shape.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: dict) -> None:
    ran = [mode for mode in MODES.values() if mode in results]
    rows = []
    for mode in ran:
        s = results[mode]
        rows.append([mode, *(f"{s[step]:.2f}" for step in STEPS), f"{s['ingest'] + s['master']:.2f}"])
    print_table(
        rows, ["photref", *(f"{step} s" for step in STEPS), "ingest+master s"], title=results["shape"]
    )
    if "server start s" in results:
        print(f"photref server start: {results['server start s']:.1f} s (once, not in the figures above)")
    tasks = results.get("master tasks")
    if tasks:
        inside = sum(tasks.values())
        parts = ", ".join(f"{name} {sec:.2f} s" for name, sec in tasks.items())
        print(
            f"inside `photref master` with the server ({results[SERVER]['master']:.2f} s): {parts}; "
            f"the rest (process start, imports, Prefect) {results[SERVER]['master'] - inside:.2f} s"
        )
    identical = results["photref masters identical"]
    print(f"the photref masters ({2 * len(ran)}: two a mode) hold identical tables: {identical}")
    for mode, target in ((SERVER, TARGET_CACHED_WITH_SERVER_S), (TEMPORARY, TARGET_CACHED_TEMPORARY_S)):
        if mode in results:
            cached = results[mode]["cached master"]
            met = verdict(cached < target)
            print(f"cached `photref master`, {mode}: {cached:.2f} s (target < {target:g} s: {met})")
    aw = results.get("autowisp")
    if not aw:
        return
    print(
        f"\nAutoWISP 2.3.0 as a process: {aw['process_s']:.1f} s (import {aw['import_s']:.1f} s, reading the"
        f" frames {aw['read_s']:.1f} s, add_input {aw['add_input_s']:.1f} s, generate_master"
        f" {aw['generate_master_s']:.1f} s; {aw['rows_not_in_catalog']:,} frame rows of stars not in the"
        " catalog left out, which AutoWISP cannot look up)"
    )
    for mode in ran:
        total = results[mode]["ingest"] + results[mode]["master"]
        ratio = aw["process_s"] / total
        one = aw["process_s"] / results[mode]["master --frames"]
        target = f" (target >= {TARGET_RATIO_WITH_SERVER:g}x: {verdict(ratio >= TARGET_RATIO_WITH_SERVER)})"
        print(
            f"  AutoWISP / photref, {mode}: ingest + master {ratio:.0f}x{target if mode == SERVER else ''};"
            f" master --frames (one command) {one:.0f}x"
        )
    print(f"photref's master read by AutoWISP's get_master_photref: {aw['photref_master_stars']:,} stars")
    rows = [
        [p, c["photref"], c["autowisp"], c["both"], f"{c['median_abs_diff']:.2g}", f"{c['max_abs_diff']:.2g}"]
        for p, c in enumerate(aw["comparison"]["per_photometry"])
    ]
    print_table(
        rows,
        ["phot", "photref stars", "AutoWISP stars", "both", "median |dmag|", "max |dmag|"],
        title="the two masters, star by star",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="shape", action="store_const", const=QUICK, help=f"{QUICK} (default)")
    size.add_argument("--full", dest="shape", action="store_const", const=FULL, help=f"{FULL}")
    size.add_argument("--shape", type=Shape.parse, help="FRAMESxSTARSxPHOTOMETRIES")
    parser.add_argument("--no-autowisp", dest="autowisp", action="store_false", help="photref's half only")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="which photref phases (default all)",
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-output" / "cli")
    args = parser.parse_args(argv)
    shape = args.shape or QUICK
    print(f"machine: {machine_description()}\nload: {load_average()}", flush=True)
    report(run_shape(shape, args.workdir.resolve(), args.modes, args.autowisp))
    print(f"\nload at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
