"""``bench/cli.py``'s photref half runs, on a tiny shape, so that the benchmark script cannot rot.

Its peer half (AutoWISP in its own environment) is not run here: it needs the peer's install and minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_cli_photref_half_runs(tmp_path):
    """A running ``photref server`` and the four steps as processes, then in process: figures for every
    step, the master run's task runs read from the server, identical masters, the results file."""
    cmd = [sys.executable, "bench/cli.py", "--shape", "8x40x2", "--no-autowisp", "--workdir", str(tmp_path)]
    cmd += ["--modes", "server", "in-process"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "results-8x40x2.json").read_text())
    for mode in ("processes, running server", "in process"):
        seconds = results[mode]
        assert set(seconds) == {"ingest", "master", "cached master", "no-op ingest", "master --frames"}
        assert all(value > 0 for value in seconds.values())
    assert "processes, temporary server" not in results and "autowisp" not in results
    assert results["photref masters identical"] is True
    assert any(name.startswith("statistics ") for name in results["master tasks"])
    assert results["server start s"] > 0
    assert "hold identical tables: True" in proc.stdout
    assert "cached `photref master`, processes, running server:" in proc.stdout
    # The bench stopped the server it started.
    assert not (tmp_path / "runs-8x40x2" / "prefect-home" / "photref-server.json").exists()
