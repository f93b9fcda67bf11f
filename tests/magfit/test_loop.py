"""The magnitude-fitting loop on simulated raw frames with a known truth (no Prefect: the core steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.table import Table

from photref_core.catalog import read_catalog
from photref_core.errors import BadInputError, FitTermsError
from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion
from photref_core.magfit.loop import check_inputs, iteration_path, magnitude_fit, summary_path
from photref_core.magfit.parameters import MagfitParameters
from photref_core.simulate.rawphotometry import simulate_raw_photometry


def ingest(store, frames, catalog):
    plan = plan_ingestion(store, frames, catalog=read_catalog(catalog))
    finalize_ingestion(store, [r for batch in plan.batches for r in ingest_batch(store, batch)])


@pytest.fixture(scope="module")
def raw_field(tmp_path_factory):
    """60 raw frames x 1,500 stars x 3 photometries, ingested, and the loop run once on it."""
    root = tmp_path_factory.mktemp("raw")
    sim = simulate_raw_photometry(root, frames=60, stars=1500, seed=3)
    store = str(root / "field.zarr")
    ingest(store, sim.frames, sim.catalog)
    summary = magnitude_fit(store, sim.catalog, root / "out" / "master.fits")
    return sim, store, summary


def aligned_truth(sim, store):
    ids = xr.open_zarr(store, consolidated=False)["source_id"].values
    truth = Table.read(sim.truth)
    order = np.searchsorted(truth["source_id"], ids)
    assert np.array_equal(np.asarray(truth["source_id"])[order], ids)
    return truth[order]


def robust_scatter(mag):
    """1.4826 x the median absolute deviation over frames, per star and photometry (NaN: never fitted)."""
    mag = mag[:, np.isfinite(mag).any(axis=(0, 2))]
    median = np.nanmedian(mag, axis=0)
    return 1.4826 * np.nanmedian(np.abs(mag - median), axis=0)


def test_the_store_keeps_the_frames_x_y_columns_per_frame_and_source(raw_field):
    sim, store, _ = raw_field
    columns = xr.open_zarr(store, group="source_columns", consolidated=False)
    root = xr.open_zarr(store, consolidated=False)
    assert sorted(columns.data_vars) == ["x", "y"]
    slot_of = {fid: k for k, fid in enumerate(root["frame_id"].values)}
    col_of = {int(s): k for k, s in enumerate(root["source_id"].values)}
    for path in sim.frames[:3]:
        table = Table.read(path)
        slot = slot_of[table.meta["FRAMEID"]]
        cols = [col_of[int(s)] for s in table["source_id"]]
        np.testing.assert_array_equal(columns["x"].values[slot, cols], table["x"])
        np.testing.assert_array_equal(columns["y"].values[slot, cols], table["y"])
        others = np.setdiff1d(np.arange(root.sizes["source"]), cols)
        assert np.isnan(columns["x"].values[slot, others]).all()


def test_the_loop_reaches_the_injected_noise_keeps_the_variables_and_converges(raw_field):
    sim, store, summary = raw_field
    truth = aligned_truth(sim, store)
    in_catalog = np.asarray(truth["in_catalog"])
    constant = ~np.asarray(truth["variable"]) & in_catalog
    noise = np.asarray(truth["noise"])
    raw = xr.open_zarr(store, consolidated=False)["mag"].values
    fitted = xr.open_zarr(store, group=summary["final_group"], consolidated=False)["mag"].values
    fitted_stars = np.isfinite(fitted).any(axis=(0, 2))
    assert np.array_equal(fitted_stars, in_catalog)
    raw_ratio = np.nanmedian(
        (robust_scatter(raw[:, in_catalog]) / noise[in_catalog])[constant[in_catalog]], axis=0
    )
    ratio = np.nanmedian((robust_scatter(fitted) / noise[in_catalog])[constant[in_catalog]], axis=0)
    assert (raw_ratio > 20).all()  # what the frames' own zero points and patterns do
    assert (ratio > 0.9).all() and (ratio < 1.10).all(), ratio
    # Stars missing from the catalog have nothing to be fitted against: NaN, never a crash.
    assert (~in_catalog).sum() > 10 and np.isnan(fitted[:, ~in_catalog]).all()
    assert np.isfinite(raw[:, ~in_catalog]).any()

    # Every variable's amplitude, fitted with its known period and phase (outliers clipped at 5 sigma),
    # within its statistical error.
    times = xr.open_zarr(store, consolidated=False)["time"].values
    z = []
    for s in np.flatnonzero(np.asarray(truth["variable"]) & in_catalog):
        wave = np.sin(2 * np.pi * (times - truth.meta["JD0"]) / truth["period"][s] + truth["phase"][s])
        for p in range(fitted.shape[2]):
            m = fitted[:, s, p]
            ok = np.isfinite(m)
            for _ in range(5):
                basis = np.column_stack([np.ones(ok.sum()), wave[ok]])
                coef = np.linalg.lstsq(basis, m[ok], rcond=None)[0]
                ok = np.isfinite(m) & (np.abs(m - coef[0] - coef[1] * wave) < 5 * noise[s, p])
            error = noise[s, p] / np.sqrt(((wave[ok] - wave[ok].mean()) ** 2).sum())
            z.append((coef[1] - truth["amplitude"][s]) / error)
    z = np.array(z)
    assert z.size >= 30 and np.abs(z).max() < 4 and np.sqrt(np.mean(z**2)) < 1.5, z

    # Converged within max_magfit_iterations, having refitted against a master at least twice.
    history = summary["iterations"]
    assert summary["converged"] and 3 <= len(history) <= 5
    assert "frame" in history[0]["reference"] and "statistics" in history[1]["reference"]
    assert history[0]["change"] is None and max(history[-1]["change"]) <= 1e-4
    assert all(entry["frames_fitted"] == 60 and entry["frames_quarantined"] == 0 for entry in history)


def test_the_loop_writes_every_iteration_master_and_its_history(raw_field):
    sim, store, summary = raw_field
    output = summary["master"]["master"]
    for entry in summary["iterations"]:
        path = iteration_path(output, entry["iteration"])
        assert entry["master"] == str(path) and path.exists()
        with fits.open(path) as hdul:
            assert hdul["INMASTER"].data["included"].sum() == 60
    saved = json.loads(summary_path(output).read_text())
    assert saved["final_group"] == summary["final_group"] and saved["stopped"].startswith("converged")
    with fits.open(output) as hdul:
        assert hdul[0].header["NFRAMES"] == 60
        ids = hdul[1].data["source_id"]
        assert ids.dtype.kind == "u" and np.all(np.diff(ids.astype(np.uint64)) > 0)
    # The final group is the store's latest magfit run, with its history.
    # The run is the store's latest magfit run, and a second call with the same inputs does no work.
    import zarr

    magfit = zarr.open_group(store, path="magfit", mode="r")
    assert magfit.attrs["latest"] == summary["run_group"]
    run = magfit[summary["run_group"].split("/", 1)[1]]
    assert run.attrs["summary"]["final_group"] == summary["final_group"]
    mtime = Path(output).stat().st_mtime_ns
    assert magnitude_fit(store, sim.catalog, output) == json.loads(json.dumps(summary))
    assert Path(output).stat().st_mtime_ns == mtime


def store_with_an_edited_frame(sim, n_frames: int, edited: int, edit, directory) -> tuple[str, Table]:
    """A new store of the field's first ``n_frames`` frames (copies), frame ``edited`` rewritten as
    ``edit(table)`` returns it; returns the store and the frame's original table."""
    frames = [directory / p.name for p in sim.frames[:n_frames]]
    for src, dst in zip(sim.frames[:n_frames], frames, strict=True):
        shutil.copy(src, dst)
    table = Table.read(frames[edited])
    changed = edit(table.copy())
    changed.meta = table.meta
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(changed)]).writeto(frames[edited], overwrite=True)
    store = str(directory / "field.zarr")
    ingest(store, frames, sim.catalog)
    return store, table


def test_a_frame_without_the_columns_the_terms_need_is_quarantined_with_its_reason(raw_field, tmp_path):
    sim, _, _ = raw_field

    def without_x(table):
        del table["x"]
        return table

    store, table = store_with_an_edited_frame(sim, 30, 0, without_x, tmp_path)
    params = MagfitParameters(max_magfit_iterations=2)
    summary = magnitude_fit(store, sim.catalog, tmp_path / "master.fits", params)
    frame_id = table.meta["FRAMEID"]
    for entry in summary["iterations"]:
        assert entry["quarantine"] == {frame_id: "has no values of column 'x', which magfit_terms uses"}
        assert entry["frames_fitted"] == 29
    with fits.open(tmp_path / "master.fits") as hdul:
        inmaster = hdul["INMASTER"].data
        assert not inmaster["included"][inmaster["frame_id"] == frame_id].any()
    assert summary["stopped"].startswith("max_magfit_iterations (2) reached")
    with pytest.raises(BadInputError, match=f"{frame_id}.*column 'x'"):
        magnitude_fit(store, sim.catalog, tmp_path / "strict.fits", params, strict=True)


def test_an_unknown_column_fails_before_any_work_naming_it(raw_field, tmp_path):
    sim, store, _ = raw_field
    with pytest.raises(FitTermsError, match="'colour'.*frame columns: x, y"):
        check_inputs(store, sim.catalog, MagfitParameters(magfit_terms="O2{colour, x}"))
    with pytest.raises(ValueError, match="magfit_terms"):
        MagfitParameters(magfit_terms="O2{x")


def test_a_reference_frame_too_poor_for_the_terms_is_refused_before_any_fit(raw_field, tmp_path):
    sim, _, _ = raw_field
    store, table = store_with_an_edited_frame(sim, 25, 3, lambda t: t[:150], tmp_path)  # < 10 x 20 terms
    frame_id = table.meta["FRAMEID"]
    from photref_core.magfit.loop import choose_reference_frame

    with pytest.raises(BadInputError, match=f"{frame_id}.*reference frame.*need 200"):
        choose_reference_frame(store, MagfitParameters(reference_frame=frame_id))
    assert choose_reference_frame(store, MagfitParameters()) != frame_id  # the default picks a rich one
    with pytest.raises(BadInputError, match="'nope' is not an ingested frame"):
        choose_reference_frame(store, MagfitParameters(reference_frame="nope"))


def test_a_finished_run_replaces_the_store_groups_of_earlier_runs(raw_field, tmp_path):
    sim, store, summary = raw_field
    copy = str(tmp_path / "field.zarr")
    shutil.copytree(store, copy)
    other = magnitude_fit(
        copy, sim.catalog, tmp_path / "master.fits", MagfitParameters(max_magfit_iterations=2)
    )
    import zarr

    magfit = zarr.open_group(copy, path="magfit", mode="r")
    assert other["run_group"] != summary["run_group"]
    assert sorted(magfit.group_keys()) == [other["run_group"].split("/", 1)[1]]
    assert magfit.attrs["latest"] == other["run_group"]
    assert xr.open_zarr(copy, group=other["final_group"], consolidated=False)["mag"].shape[0] == 60
