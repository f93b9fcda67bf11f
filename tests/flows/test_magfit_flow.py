"""``photref magfit`` end to end on a real Prefect server: ingestion, the loop as tasks, the products, the
cached re-run; and its options built from the two parameter objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from flows.cli import build_parser, main
from photref_core.magfit.parameters import MAGFIT_DEFAULTS, MagfitParameters
from photref_core.master.parameters import MASTER_DEFAULTS
from photref_core.simulate.rawphotometry import simulate_raw_photometry


def test_magfit_options_are_the_fields_of_both_parameter_objects():
    parser = build_parser()
    base = ["magfit", "s.zarr", "f1.fits", "f2.fits", "--catalog", "c.fits", "--output", "m.fits"]
    args = parser.parse_args(base)
    assert args.frames == ["f1.fits", "f2.fits"]
    assert {name: getattr(args, name) for name in MAGFIT_DEFAULTS} == MAGFIT_DEFAULTS
    assert {name: getattr(args, name) for name in MASTER_DEFAULTS} == MASTER_DEFAULTS
    args = parser.parse_args(
        base + ["--max-iterations", "3", "--reference-frame", "F7", "--outlier-threshold", "4"]
    )
    params = MagfitParameters(**{name: getattr(args, name) for name in MAGFIT_DEFAULTS})
    assert (params.max_magfit_iterations, params.reference_frame, args.outlier_threshold) == (3, "F7", 4.0)
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--magfit-weighting", "squared"])


def test_photref_magfit_runs_the_loop_as_a_user_would(prefect_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    sim = simulate_raw_photometry(tmp_path / "field", frames=40, stars=900, seed=5)
    store = tmp_path / "field.zarr"
    output = tmp_path / "out" / "master.fits"
    output.parent.mkdir()
    command = [
        "magfit",
        str(store),
        str(tmp_path / "field" / "frames" / "*.fits"),
        "--catalog",
        str(sim.catalog),
    ]
    command += [
        "--output",
        str(output),
        "--magfit-terms",
        "O2{phot_g_mean_mag, x, y}",
        "--no-plots",
        "--json",
    ]
    assert main(command) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["converged"] and len(summary["iterations"]) == 3
    assert [entry["frames_fitted"] for entry in summary["iterations"]] == [40, 40, 40]
    for k in range(3):
        assert (tmp_path / "out" / f"master_iter{k}.fits").exists()
    assert (tmp_path / "out" / "master_stat.fits").exists()
    assert (
        json.loads((tmp_path / "out" / "master_magfit.json").read_text())["final_group"]
        == summary["final_group"]
    )
    fitted = xr.open_zarr(store, group=summary["final_group"], consolidated=False)
    assert fitted["mag"].dims == ("frame", "source", "photometry") and fitted["fitted"].values.all()
    with fits.open(output) as hdul:
        assert hdul[0].header["NFRAMES"] == 40 and len(hdul[1].data) > 700

    # Unchanged inputs: nothing runs again and the products are untouched.
    mtime = output.stat().st_mtime_ns
    assert main(command) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["final_group"] == summary["final_group"] and output.stat().st_mtime_ns == mtime

    # An unknown column fails before any work, naming it.
    assert main(command + ["--magfit-terms", "O1{x, colour}", "--output", str(tmp_path / "bad.fits")]) == 2
    assert "'colour'" in capsys.readouterr().err
    assert not (tmp_path / "bad.fits").exists()
    assert np.isfinite(fitted["mag"].values).any()
