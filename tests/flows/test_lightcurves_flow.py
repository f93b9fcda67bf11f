"""``photref lightcurves`` as a user runs it, on a real Prefect server: the file, per-star files, the
cached re-run, a deleted product written again, and the errors a user meets first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main
from photref_core.catalog import read_catalog
from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion
from photref_core.magfit import lightcurves as lc
from photref_core.magfit.loop import magnitude_fit
from photref_core.simulate.rawphotometry import simulate_raw_photometry


@pytest.fixture(scope="module")
def fitted_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("lc-flow")
    sim = simulate_raw_photometry(root, frames=16, stars=260, seed=4)
    store = str(root / "field.zarr")
    plan = plan_ingestion(store, sim.frames, catalog=read_catalog(sim.catalog))
    finalize_ingestion(store, [r for batch in plan.batches for r in ingest_batch(store, batch)])
    return sim, store


def test_photref_lightcurves_writes_the_file_and_per_star_files(
    fitted_store, prefect_server, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    sim, store = fitted_store
    output, stars = tmp_path / "lc.parquet", tmp_path / "stars"
    command = ["lightcurves", store, "--output", str(output), "--per-star", str(stars)]

    # Before the loop has run: a clear error saying what to run, nothing written.
    assert main(command) == 2
    assert "run `photref magfit" in capsys.readouterr().err
    assert not output.exists()

    magnitude_fit(store, sim.catalog, tmp_path / "master.fits")
    assert main(command) == 0
    text = capsys.readouterr().out  # a short summary for a person
    assert text.startswith(f"light curves: {len(lc.light_curves(store))} measurements of 260 stars -> ")
    assert main([*command, "--json"]) == 0  # everything, for a program
    result = json.loads(capsys.readouterr().out)
    expected = lc.light_curves(store)
    assert (result["format"], result["rows"], result["stars"]) == ("parquet", len(expected), 260)
    back = lc.read_light_curves(output)
    for name in lc.LIGHT_CURVE_COLUMNS:
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(expected[name]), err_msg=name)
    assert len(list(stars.glob("*.parquet"))) == 260

    # Unchanged: served from the cache, the file untouched; deleted: written again.
    mtime = output.stat().st_mtime_ns
    assert main(command) == 0
    capsys.readouterr()
    assert output.stat().st_mtime_ns == mtime
    output.unlink()
    assert main(command) == 0
    capsys.readouterr()
    assert len(lc.read_light_curves(output)) == len(expected)

    # Raw magnitudes, as FITS, for two stars of a list.
    ids = np.unique(np.asarray(expected["source_id"]))[[0, 7]]
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(str(s) for s in ids) + "\n")
    raw_output = tmp_path / "raw.fits"
    assert main(["lightcurves", store, "--output", str(raw_output), "--sources", str(listing), "--raw"]) == 0
    capsys.readouterr()
    raw = lc.read_light_curves(raw_output)
    assert set(np.asarray(raw["source_id"]).tolist()) == set(ids.tolist())
    assert raw.meta["magnitudes"] == "raw"


def test_photref_lightcurves_needs_an_output_or_a_directory(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lightcurves", "field.zarr"])
    assert exc.value.code == 2
    assert "give --output, --per-star, or both" in capsys.readouterr().err
