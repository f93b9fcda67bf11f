"""Helpers of the reliability tests: snapshots and comparisons of stores and masters, a watcher that proves
a master is never seen half-written, and the launcher of flow runs in child processes.

Imported by the test modules of this directory (pytest puts the directory on ``sys.path``: there is no
``__init__.py`` here on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from astropy.io import fits

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "child_flow.py"

# CHECKSUM's value covers its own comment, which carries the time of writing ("HDU checksum updated
# <time>"): the one card two otherwise identical masters written at different times cannot share.
ALWAYS_DIFFERENT = frozenset({"CHECKSUM"})


# --------------------------------------------------------------------------------------------------
# Masters
# --------------------------------------------------------------------------------------------------


def master_snapshot(path) -> list[dict]:
    """Every HDU of a FITS file: its name, header cards (keyword -> value) and table columns."""
    hdus = []
    with fits.open(path, memmap=False) as hdul:
        for hdu in hdul:
            cards = {}
            for card in hdu.header.cards:
                key = card.keyword
                if key in ("COMMENT", "HISTORY", ""):
                    cards.setdefault(key, []).append(str(card.value))
                else:
                    cards[key] = card.value
            columns = {}
            if isinstance(hdu, fits.BinTableHDU):
                for name in hdu.columns.names:
                    columns[name] = np.array(hdu.data[name])
            hdus.append({"name": hdu.name, "ver": hdu.ver, "cards": cards, "columns": columns})
    return hdus


def assert_same_master(actual, expected, differ: Iterable[str] = ("STORE",)) -> None:
    """Two masters are the same file but for the header keywords in ``differ`` (and CHECKSUM's time).

    Data are compared exactly (NaN equal to NaN): the flows are deterministic, so a re-run after a crash
    must reproduce the undisturbed run to the bit, not just to 1e-12.
    """
    a = master_snapshot(actual) if not isinstance(actual, list) else actual
    b = master_snapshot(expected) if not isinstance(expected, list) else expected
    assert [(h["name"], h["ver"]) for h in a] == [(h["name"], h["ver"]) for h in b], "HDU lists differ"
    skip = ALWAYS_DIFFERENT | set(differ)
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        kx = {k: v for k, v in x["cards"].items() if k not in skip}
        ky = {k: v for k, v in y["cards"].items() if k not in skip}
        assert list(kx) == list(ky), f"HDU {index}: header keywords differ: {list(kx)} != {list(ky)}"
        for key in kx:
            assert kx[key] == ky[key], f"HDU {index} {key}: {kx[key]!r} != {ky[key]!r}"
        assert list(x["columns"]) == list(y["columns"]), f"HDU {index}: columns differ"
        for name in x["columns"]:
            u, v = x["columns"][name], y["columns"][name]
            assert u.dtype == v.dtype, f"HDU {index} column {name}: {u.dtype} != {v.dtype}"
            np.testing.assert_array_equal(u, v, err_msg=f"HDU {index} ({x['name']}) column {name}")


def check_complete_fits(path, expected_names: list[str]) -> None:
    """Raise unless ``path`` is a whole FITS file: the expected HDUs, valid checksums, readable data."""
    with fits.open(path, memmap=False) as hdul:
        names = [hdu.name for hdu in hdul]
        if names != expected_names:
            raise AssertionError(f"{path}: HDUs {names}, expected {expected_names}")
        for hdu in hdul:
            if hdu.verify_checksum() != 1 or hdu.verify_datasum() != 1:
                raise AssertionError(f"{path}: HDU {hdu.name} fails its checksum")
            if isinstance(hdu, fits.BinTableHDU):
                for name in hdu.columns.names:
                    np.asarray(hdu.data[name])


def master_hdu_names(n_photometries: int) -> list[str]:
    return ["PRIMARY"] + ["MPHOTREF"] * n_photometries + ["INMASTER"]


class FileWatcher:
    """Polls files in a thread; whenever one exists it must open as a complete FITS file.

    ``seen`` counts the complete observations per path (proof that the watcher looked while the file
    existed); ``errors`` lists every partial or unreadable observation.
    """

    def __init__(self, expected: dict[str, list[str]], interval: float = 0.003):
        self.expected = {os.fspath(p): names for p, names in expected.items()}
        self.interval = interval
        self.seen = dict.fromkeys(self.expected, 0)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fits-watcher", daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for path, names in self.expected.items():
                try:
                    check_complete_fits(path, names)
                except FileNotFoundError:
                    continue
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    # No false alarm from an atomic replace: an open file keeps reading its old inode.
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    self.seen[path] += 1
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


# --------------------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------------------


def store_snapshot(store) -> dict:
    """The store's contents by frame id and source id (independent of slot order), with sanity checks.

    Returns ``{"source_id": sorted ids, "frames": {frame_id: (state, path, time, mag, mag_err)}}`` with
    the rows in source-id order. Raises if a frame id or a source id appears twice.
    """
    from photref_core.store.schema import open_store

    group = open_store(store)
    ids = group["source_id"][:]
    assert np.unique(ids).size == ids.size, f"{store}: duplicate source ids on the source axis"
    order = np.argsort(ids)
    frame_ids = [str(f) for f in group["frame_id"][:]]
    assert len(set(frame_ids)) == len(frame_ids), f"{store}: duplicate frame ids: {sorted(frame_ids)}"
    mag, err = group["mag"][:], group["mag_err"][:]
    state, paths, times = group["frame_state"][:], group["frame_path"][:], group["time"][:]
    frames = {
        fid: (int(state[k]), str(paths[k]), float(times[k]), mag[k][order], err[k][order])
        for k, fid in enumerate(frame_ids)
    }
    return {"source_id": ids[order], "in_catalog": group["in_catalog"][:][order], "frames": frames}


def assert_same_store(actual, expected: dict) -> None:
    """The store holds exactly the frames and sources of ``expected`` (a :func:`store_snapshot`)."""
    snap = store_snapshot(actual)
    np.testing.assert_array_equal(snap["source_id"], expected["source_id"])
    np.testing.assert_array_equal(snap["in_catalog"], expected["in_catalog"])
    missing = sorted(set(expected["frames"]) - set(snap["frames"]))
    extra = sorted(set(snap["frames"]) - set(expected["frames"]))
    assert not missing and not extra, f"frames missing {missing}, unexpected {extra}"
    for fid, (state, path, t, mag, err) in expected["frames"].items():
        got = snap["frames"][fid]
        assert got[0] == state, f"frame {fid}: state {got[0]} != {state}"
        assert got[1] == path, f"frame {fid}: path {got[1]} != {path}"
        np.testing.assert_array_equal(got[2], t)
        np.testing.assert_array_equal(got[3], mag, err_msg=f"frame {fid} mag")
        np.testing.assert_array_equal(got[4], err, err_msg=f"frame {fid} mag_err")


# --------------------------------------------------------------------------------------------------
# Prefect
# --------------------------------------------------------------------------------------------------


FINAL_STATES = frozenset({"Completed", "Cached", "Failed", "Crashed", "Cancelled"})


def task_runs(flow_run_id, settle: float = 60.0) -> list[dict]:
    """Name, state and run count of every task run of a flow run, read back from the Prefect server.

    Prefect 3 records task-run states through events that the server processes asynchronously, so right
    after a flow returns the server may still show an attempt as running or a retry not yet counted: read
    until every task run is in a final state and two reads in a row agree (at most ``settle`` seconds).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return sorted(
                ({"name": r.name, "state": r.state.name, "run_count": r.run_count} for r in runs),
                key=lambda r: r["name"],
            )

    deadline = time.monotonic() + settle
    previous = None
    while True:
        runs = asyncio.run(read())
        if runs == previous and all(r["state"] in FINAL_STATES for r in runs):
            return runs
        if time.monotonic() > deadline:
            return runs
        previous = runs
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------------


class Launcher:
    """The zygote of ``child_flow.py``: forks a pre-imported child process per flow run."""

    def __init__(self, api_url: str, logdir: Path):
        env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(ROOT))
        self._log = open(Path(logdir) / "zygote.err", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lock = threading.Lock()
        line = self.proc.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"the flow launcher did not start: {line!r}, see {self._log.name}")

    def start(self, spec: dict, workdir, name: str) -> Child:
        """Fork a child that runs ``spec`` (see ``child_flow.py``); its files go to ``workdir``."""
        workdir = Path(workdir)
        spec = dict(
            spec,
            events=str(workdir / f"{name}.events"),
            stdout=str(workdir / f"{name}.out"),
            stderr=str(workdir / f"{name}.err"),
        )
        with self._lock:
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
            pid = int(self.proc.stdout.readline())
        return Child(pid, spec, name)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Child:
    """A flow run in a child process forked by :class:`Launcher`, and the events it reports."""

    def __init__(self, pid: int, spec: dict, name: str):
        self.pid, self.spec, self.name = pid, spec, name

    def events(self) -> list[dict]:
        try:
            text = Path(self.spec["events"]).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def event(self, kind: str) -> dict | None:
        return next((e for e in self.events() if e["event"] == kind), None)

    @property
    def returncode(self) -> int | None:
        done = self.event("exit")
        return None if done is None else done["status"]

    def wait_event(self, kind: str, timeout: float = 120.0) -> dict:
        found = wait_for(lambda: self.event(kind) or (self.returncode is not None and "exited"), timeout)
        if found == "exited":
            found = self.event(kind)
            if found is None:
                raise AssertionError(f"{self.name} exited ({self.returncode}) before {kind!r}: {self.tail()}")
        return found

    def kill(self) -> int:
        """SIGKILL (if still running); returns the exit status (-9 when the signal killed it)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def wait(self, timeout: float = 300.0) -> int:
        return wait_for(lambda: self.event("exit"), timeout)["status"]

    @property
    def stderr(self) -> str:
        return Path(self.spec["stderr"]).read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return Path(self.spec["stdout"]).read_text(errors="replace")

    def result(self) -> dict:
        """The JSON the child printed when its flow returned."""
        lines = [line for line in self.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, f"{self.name} printed no result: {self.tail()}"
        return json.loads(lines[-1][len("RESULT ") :])

    def tail(self) -> str:
        return f"stdout: {self.stdout[-1500:]!r}; stderr: {self.stderr[-3000:]!r}"


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.01):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached in {timeout} s")
        time.sleep(interval)
