"""``bench/prf_kepler.py``'s photref half runs, so that the benchmark script cannot rot.

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
def test_bench_prf_kepler_photref_half_runs(tmp_path):
    """``photref prf`` as a process on the Kepler frame: its check, NaN sources and chi^2/dof in the
    results file, the table printed."""
    cmd = [sys.executable, "bench/prf_kepler.py", "--no-psfmachine", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"photref"}
    photref = results["photref"]
    assert 0.99 <= photref["median_ratio"] <= 1.05 and photref["n_stars"] >= 10
    assert len(photref["nan_sources"]) == 1
    assert photref["residuals"]["robust_chi2_per_dof"] > 0 and photref["residuals"]["source_pixels"] > 1000
    assert "fit/aperture" in proc.stdout and (tmp_path / "photref-model.fits").stat().st_size > 0
