"""Light curves out of a store (SPEC 9): the rows against the store, read by a slow literal reference; the
flags; blocks; FITS and parquet; per-star files; source lists; the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table

from photref_core.catalog import read_catalog
from photref_core.errors import BadInputError, StoreError
from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion
from photref_core.magfit import lightcurves as lc
from photref_core.magfit.loop import latest_summary, magnitude_fit
from photref_core.magfit.parameters import MagfitParameters
from photref_core.simulate.rawphotometry import simulate_raw_photometry
from photref_core.store.groups import load_group

QUARANTINED_FRAME = 4  # the frame written without its x column: every fit quarantines it


def ingest(store, frames, catalog):
    plan = plan_ingestion(store, frames, catalog=None if catalog is None else read_catalog(catalog))
    finalize_ingestion(store, [r for batch in plan.batches for r in ingest_batch(store, batch)])


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """24 raw frames x 300 stars x 3 photometries, one frame without its x column, and the loop run on it.

    Ingested in two batches, the 40 smallest ids absent from the first (its frames lack their rows): the
    store's source axis is two sorted runs, not sorted as a whole, as after nights adding new stars."""
    root = tmp_path_factory.mktemp("lightcurves")
    sim = simulate_raw_photometry(root, frames=24, stars=300, seed=11)
    table = Table.read(sim.frames[QUARANTINED_FRAME])
    table.remove_column("x")
    table.write(sim.frames[QUARANTINED_FRAME], overwrite=True)
    late = np.sort(np.asarray(Table.read(sim.catalog)["source_id"]))[:40]
    for path in sim.frames[:12]:
        table = Table.read(path)
        table[~np.isin(table["source_id"], late)].write(path, overwrite=True)
    store = str(root / "field.zarr")
    ingest(store, sim.frames[:12], None)
    ingest(store, sim.frames, sim.catalog)
    ids = xr.open_zarr(store, consolidated=False)["source_id"].values
    assert (np.diff(ids.astype(np.float64)) < 0).any()
    # Second-order terms: 100 stars a fit, so the first batch's frames (40 stars fewer) are fitted too.
    params = MagfitParameters(magfit_terms="O2{phot_g_mean_mag, x, y}")
    summary = magnitude_fit(store, sim.catalog, root / "out" / "master.fits", params)
    assert list(summary["iterations"][-1]["quarantine"]) == [Path(sim.frames[QUARANTINED_FRAME]).stem]
    return root, store, summary


def reference_rows(store, raw: bool = False) -> Table:
    """The light curves by the SPEC's words, one measurement at a time (slow, obviously correct)."""
    root = xr.open_zarr(store, consolidated=False)
    summary = latest_summary(store)
    final = summary["iterations"][-1]
    fitted_group = xr.open_zarr(store, group=final["group"], consolidated=False)
    data = root if raw else fitted_group
    in_master = load_group(store, final["fit"])["in_master"].values
    stats = load_group(store, final["statistics"])
    ids = root["source_id"].values
    state = root["frame_state"].values
    fitted = fitted_group["fitted"].values
    times = root["time"].values
    frame_ids = root["frame_id"].values
    raw_mag = root["mag"].values
    mag, mag_err = data["mag"].values, data["mag_err"].values
    master_mag, master_err = fitted_group["mag"].values, fitted_group["mag_err"].values
    frames = sorted((f for f in range(len(state)) if state[f] == 1), key=lambda f: (times[f], f))
    used = [f for f in frames if fitted[f]]
    rows = []
    for s in sorted(range(ids.size), key=lambda s: int(ids[s])):
        outlier = np.zeros((len(state), mag.shape[2]), bool)
        for p in range(mag.shape[2]):
            usable = [f for f in used if math.isfinite(master_mag[f, s, p]) and master_err[f, s, p] > 0]
            values = sorted(float(master_mag[f, s, p]) for f in usable)
            kept = int(stats["rejected_count"].values[s, p])
            # The master kept a run of the sorted values; which run: the one whose median is its centre.
            runs = [values[i : i + kept] for i in range(len(values) - kept + 1)]
            centre = stats["magnitude"].values[s, p]
            run = (
                next(r for r in runs if r and (r[(kept - 1) // 2] + r[kept // 2]) / 2 == centre)
                if kept
                else []
            )
            for f in usable:
                outlier[f, p] = not (run and run[0] <= master_mag[f, s, p] <= run[-1])
        for f in frames:
            if not np.isfinite(raw_mag[f, s]).any():
                continue
            flag = np.zeros(mag.shape[2], np.uint8)
            for p in range(mag.shape[2]):
                flag[p] = (
                    (0 if fitted[f] else lc.FRAME_QUARANTINED)
                    | (lc.OUTLIER if outlier[f, p] else 0)
                    | (0 if in_master[s, p] else lc.NOT_IN_MASTER)
                    | (0 if np.isfinite(mag[f, s, p]) else lc.NO_VALUE)
                )
            rows.append((str(frame_ids[f]), times[f], ids[s], mag[f, s], mag_err[f, s], flag))
    return Table(rows=rows, names=lc.LIGHT_CURVE_COLUMNS)


def assert_same_rows(got: Table, expected: Table):
    assert len(got) == len(expected)
    for name in lc.LIGHT_CURVE_COLUMNS:
        a, b = np.asarray(got[name]), np.asarray(expected[name])
        if name == "frame_id":
            a, b = a.astype(str), b.astype(str)
        if name == "source_id":
            assert a.dtype == np.uint64
        np.testing.assert_array_equal(a, b, err_msg=name)  # NaN equals NaN here


def test_the_table_is_the_store_read_measurement_by_measurement(field):
    _, store, _ = field
    table = lc.light_curves(store)
    assert_same_rows(table, reference_rows(store))
    ids = np.asarray(table["source_id"])
    assert ids.max() > 2**53  # Gaia-like ids: a float64 would round them
    root = xr.open_zarr(store, consolidated=False)
    assert set(ids.tolist()) <= set(root["source_id"].values.tolist())
    # sorted by source, then time
    order = np.lexsort((np.asarray(table["time"]), ids))
    assert np.array_equal(order, np.arange(len(table)))
    flags = np.asarray(table["flag"])
    assert (flags & lc.OUTLIER).any() and (flags & lc.NOT_IN_MASTER).any()


def test_a_frame_the_fit_quarantined_keeps_its_rows_as_nan_with_the_flag(field):
    _, store, _ = field
    table = lc.light_curves(store)
    frame_id = str(xr.open_zarr(store, consolidated=False)["frame_id"].values[QUARANTINED_FRAME])
    rows = table[table["frame_id"] == frame_id]
    assert len(rows) > 200
    assert np.isnan(rows["mag"]).all()
    assert (rows["flag"] & (lc.FRAME_QUARANTINED | lc.NO_VALUE) == lc.FRAME_QUARANTINED | lc.NO_VALUE).all()
    others = table[table["frame_id"] != frame_id]
    assert not (others["flag"] & lc.FRAME_QUARANTINED).any()
    assert (np.isnan(others["mag"]) == ((others["flag"] & lc.NO_VALUE) > 0)).all()


def test_the_outlier_flag_leaves_exactly_the_master_kept_measurements(field):
    """Independent of how the flag is computed: per star and photometry, the unflagged measurements of the
    frames the master used are as many as the master's statistics kept, and their median is its centre."""
    _, store, summary = field
    table = lc.light_curves(store)
    stats = load_group(store, summary["iterations"][-1]["statistics"])
    ids = stats["source_id"].values
    position = {int(s): k for k, s in enumerate(ids)}
    mags = np.asarray(table["mag"])
    good = (np.asarray(table["flag"]) & (lc.FRAME_QUARANTINED | lc.OUTLIER | lc.NO_VALUE)) == 0
    star = np.array([position[int(s)] for s in table["source_id"]])
    for p in range(mags.shape[1]):
        counts = np.bincount(star[good[:, p]], minlength=ids.size)
        np.testing.assert_array_equal(counts, stats["rejected_count"].values[:, p])
        for s in np.flatnonzero(counts)[:50]:
            kept = mags[(star == s) & good[:, p], p]
            assert np.median(kept) == stats["magnitude"].values[s, p]


@pytest.mark.parametrize("format", lc.LIGHT_CURVE_FORMATS)
def test_a_file_written_in_many_source_blocks_equals_the_in_memory_table(field, tmp_path, format):
    _, store, _ = field
    expected = lc.light_curves(store)
    source = lc.open_light_curves(store)
    block_bytes = 7 * lc.block_bytes_per_source(source)  # 7 sources a block: through the scratch copy
    blocks = list(lc.light_curve_blocks(source, block_bytes))
    assert len(blocks) == math.ceil(source.source_index.size / 7)
    output = tmp_path / f"lc.{format}"
    result = lc.write_light_curves(store, output, block_bytes=block_bytes)
    assert sorted(path.name for path in tmp_path.iterdir()) == [output.name]  # no scratch left behind
    assert (result["format"], result["rows"], result["stars"]) == (format, len(expected), 300)
    back = lc.read_light_curves(output)
    assert_same_rows(back, expected)
    assert json.loads(back.meta["flag_bits"]) == {str(bit): text for bit, text in lc.FLAG_BITS.items()}
    assert back.meta["magfit_run"] == latest_summary(store)["run_group"]


@pytest.mark.parametrize("format", lc.LIGHT_CURVE_FORMATS)
def test_per_star_files_hold_each_star_rows_named_by_its_id(field, tmp_path, format):
    _, store, _ = field
    expected = lc.light_curves(store)
    directory = tmp_path / "stars"
    block_bytes = 5 * lc.block_bytes_per_source(lc.open_light_curves(store))
    result = lc.write_light_curves(store, per_star=directory, format=format, block_bytes=block_bytes)
    files = sorted(directory.glob(f"*.{format}"))
    assert len(files) == result["stars"] == len(np.unique(expected["source_id"]))
    for path in files[:: max(1, len(files) // 20)]:
        star = np.uint64(int(path.name.split(".")[0]))
        assert_same_rows(lc.read_light_curves(path), expected[expected["source_id"] == star])
    manifest = json.loads((directory / "lightcurves.json").read_text())
    assert manifest["rows"] == len(expected)


def test_a_source_list_selects_those_stars_and_unknown_ids_are_named(field, tmp_path):
    _, store, _ = field
    everything = lc.light_curves(store)
    ids = np.unique(np.asarray(everything["source_id"]))
    chosen = ids[[3, 50, 299]]
    listing = tmp_path / "ids.txt"
    listing.write_text("# stars to export\n" + "\n".join(str(s) for s in chosen[::-1]) + "\n\n")
    table = lc.light_curves(store, sources=lc.read_source_ids(listing))
    assert_same_rows(table, everything[np.isin(everything["source_id"], chosen)])
    unknown = int(ids.max()) + 1  # one more than a Gaia-like id: exact only as an integer
    listing.write_text(f"{chosen[0]}\n{unknown}\n")
    with pytest.raises(BadInputError, match=rf"ids.txt: 1 source id\(s\) not in the store .*{unknown}"):
        lc.write_light_curves(
            store, tmp_path / "lc.fits", sources=lc.read_source_ids(listing), sources_path=listing
        )
    assert not (tmp_path / "lc.fits").exists()
    listing.write_text("12\nstar-7\n")
    with pytest.raises(BadInputError, match=r"ids.txt: line 2: 'star-7' is not a source id"):
        lc.read_source_ids(listing)


def test_raw_light_curves_are_the_ingested_magnitudes(field):
    _, store, _ = field
    expected = reference_rows(store, raw=True)
    assert_same_rows(lc.light_curves(store, raw=True), expected)
    # In blocks: the raw values and the final iteration's (for the outlier bit) through the scratch copy.
    block_bytes = 11 * lc.block_bytes_per_source(lc.open_light_curves(store, raw=True))
    assert_same_rows(lc.light_curves(store, raw=True, block_bytes=block_bytes), expected)


def test_a_store_without_magfit_results_says_to_run_photref_magfit_first(tmp_path):
    sim = simulate_raw_photometry(tmp_path, frames=6, stars=60, seed=2)
    store = str(tmp_path / "field.zarr")
    ingest(store, sim.frames, sim.catalog)
    with pytest.raises(StoreError, match=r"no magnitude-fitting results.*run `photref magfit"):
        lc.write_light_curves(store, tmp_path / "lc.fits")
    assert not (tmp_path / "lc.fits").exists()
    raw = lc.light_curves(store, raw=True)  # the raw magnitudes need no loop; only NO_VALUE can be set
    root = xr.open_zarr(store, consolidated=False)
    assert len(raw) == int(np.isfinite(root["mag"].values).any(axis=2).sum())
    assert set(np.unique(raw["flag"]).tolist()) <= {0, lc.NO_VALUE}


def test_a_store_changed_since_the_loop_is_refused_and_raw_exports_lose_the_stale_flags(tmp_path):
    sim = simulate_raw_photometry(tmp_path, frames=8, stars=120, seed=6)
    store = str(tmp_path / "field.zarr")
    ingest(store, sim.frames[:6], sim.catalog)
    params = MagfitParameters(magfit_terms="O1{phot_g_mean_mag, x, y}")
    magnitude_fit(store, sim.catalog, tmp_path / "out" / "master.fits", params)
    assert len(lc.light_curves(store)) > 0
    ingest(store, sim.frames, sim.catalog)  # two new frames the loop did not see
    with pytest.raises(StoreError, match=r"changed \(frames ingested\) since its last magnitude fit.*again"):
        lc.light_curves(store)
    raw = lc.light_curves(store, raw=True)
    assert len(np.unique(raw["frame_id"])) == 8 and raw.meta["magfit_run"] == ""
    assert set(np.unique(raw["flag"]).tolist()) <= {0, lc.NO_VALUE}
