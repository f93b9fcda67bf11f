"""``bench/prf.py``'s photref half runs, on a tiny shape, so that the benchmark script cannot rot.

Its peer half (psfmachine 1.1.4 in its own environment) is not run here: it needs the peer's install.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_prf_photref_half_runs(tmp_path):
    """``photref prf`` as a process with a running server: its phases read back from the server, its
    fluxes scored against the truth, the in-process kernel figures, the results file."""
    cmd = [sys.executable, "bench/prf.py", "--shape", "40x96x3", "--no-psfmachine", "--modes", "server"]
    cmd += ["--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "results-40x96x3.json").read_text())
    assert "psfmachine" not in results and "temporary" not in results
    server = results["server"]
    assert server["process_s"] > 0 and server["server start s"] > 0
    assert {"images in", "shape model", "fits", "products"} <= set(server["phases"])
    assert all(v > 0 for k, v in server["phases"].items() if k != "the rest")
    assert abs(server["accuracy"]["flux_scale"] - 1) < 0.05
    kernel = results["kernel"]
    assert kernel["fit_ms"] > 0 and kernel["max_diff_sigma"] < 1e-6
    assert "in process, one BLAS thread" in proc.stdout
    # The bench stopped the server it started.
    assert not (tmp_path / "runs-40x96x3" / "prefect-server" / "photref-server.json").exists()


@pytest.mark.slow
def test_bench_prf_time_model_photref_half_runs(tmp_path):
    """``bench/prf.py --time-model``'s photref half: the command with the time model and its perturbation,
    scored against the oracle, the static set of the same run, the results file."""
    cmd = [sys.executable, "bench/prf.py", "--time-model", "--shape", "30x48x12", "--no-psfmachine"]
    cmd += ["--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results-time-model-30x48x12.json").read_text())
    rows = {r["run"]: r for r in results["rows"]}
    assert set(rows) == {"photref prf --time-model --perturbation", "photref, same run, static fluxes"}
    assert rows["photref prf --time-model --perturbation"]["s"] > 0
    assert all(0.5 < r["scatter/oracle"] < 50 for r in rows.values())
    assert results["oracle_scatter"] > 0 and "scatter / oracle" in proc.stdout
