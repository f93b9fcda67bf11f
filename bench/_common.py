"""Helpers shared by the benchmark scripts in ``bench/``: machine description, peak-RSS sampling, tables.

Nothing here imports Prefect (the scripts set Prefect's environment before they import it).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def machine_description() -> str:
    """One line: cores, memory, Python, platform."""
    vm = psutil.virtual_memory()
    return (
        f"{os.cpu_count()} cores, {vm.total / 2**30:.1f} GiB RAM ({vm.available / 2**30:.1f} GiB available), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages (other users of the machine distort the timings)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min, {os.cpu_count()} cores)"


def ru_maxrss_mib() -> float:
    """Peak resident set size of this process so far (``getrusage``; KiB on Linux), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / MIB


def rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    return psutil.Process().memory_info().rss / MIB


class PeakRSS:
    """Peak RSS of this process during a block, sampled by a background thread.

    ``ru_maxrss`` only ever grows over the life of the process, so it cannot give the peak of a later,
    smaller phase; this samples ``psutil`` every ``interval`` seconds instead (a spike shorter than the
    interval can be missed). Use as a context manager; ``peak_mib`` and ``start_mib`` are set after it.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start_mib = 0.0
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def _run(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / MIB)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start_mib = self.peak_mib = rss_mib()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())
        return False

    @property
    def growth_mib(self) -> float:
        """Peak minus the RSS at the start of the block."""
        return self.peak_mib - self.start_mib


@contextmanager
def timed():
    """``with timed() as t: ...``; ``t()`` is the elapsed wall time in seconds (final after the block)."""
    start = time.perf_counter()
    end = None

    def elapsed() -> float:
        return (end if end is not None else time.perf_counter()) - start

    try:
        yield elapsed
    finally:
        end = time.perf_counter()


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes used by the files under ``path`` (``du -sb``; 0 when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return 0
    if shutil.which("du"):
        out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout:
            return int(out.stdout.split()[0])
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_table(rows: list[list], headers: list[str], align: str | None = None) -> str:
    """A plain-text table. ``align`` has one character per column, 'l' or 'r' (default: first left)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(row):
        return "  ".join(
            c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def print_table(rows: list[list], headers: list[str], align: str | None = None, title: str | None = None):
    """Print :func:`format_table` (with an optional title line), flushing stdout."""
    if title:
        print(f"\n{title}")
    print(format_table(rows, headers, align), flush=True)
