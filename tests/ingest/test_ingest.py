"""Ingestion into the zarr store: exact contents, xarray view, re-runs, SIGKILL, new frames, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.io import fits
from astropy.table import Table

from photref_core.catalog import read_catalog
from photref_core.errors import BadInputError, StoreError
from photref_core.ingest.readers import read_frame
from photref_core.store.schema import INGESTED, QUARANTINED, open_dataset, open_store

ROOT = Path(__file__).resolve().parents[2]


def store_by_ids(store):
    """{frame_id: (source_ids, mag, mag_err, state)} from the store, sources sorted by id."""
    group = open_store(store)
    ids = group["source_id"][:]
    order = np.argsort(ids)
    mag, err = group["mag"][:], group["mag_err"][:]
    state = group["frame_state"][:]
    return {
        str(fid): (ids[order], mag[k][order], err[k][order], int(state[k]))
        for k, fid in enumerate(group["frame_id"][:])
    }


def assert_store_matches_frames(store, paths, catalog_ids=None):
    """Every frame's rows in the store equal a direct read of its file: exactly, NaN where missing."""
    contents = store_by_ids(store)
    all_ids = None
    for path in paths:
        frame = read_frame(path)
        ids, mag, err, state = contents[frame.header.frame_id]
        assert state == INGESTED, path
        all_ids = ids
        expected_mag = np.full_like(mag, np.nan)
        expected_err = np.full_like(err, np.nan)
        pos = np.searchsorted(ids, frame.header.source_id)
        expected_mag[pos] = frame.mag
        expected_err[pos] = frame.mag_err
        np.testing.assert_array_equal(mag, expected_mag)
        np.testing.assert_array_equal(err, expected_err)
    if catalog_ids is not None:
        assert np.isin(catalog_ids, all_ids).all()


def run_ingest(store, frames, catalog=None, **kw):
    from flows.ingest import run_ingest as run

    return run(store, frames, catalog=catalog, max_workers=2, **kw)


@pytest.fixture
def field(small_field, tmp_path):
    """A private copy of the small simulated field (tests may damage it)."""
    dst = tmp_path / "field"
    shutil.copytree(Path(small_field.catalog).parent, dst)
    frames = sorted((dst / "frames").glob("*.fits"))
    return dst, frames, dst / "catalog.fits"


def test_store_equals_direct_read_and_xarray_view(prefect_server, field, tmp_path):
    root, frames, catalog = field
    store = tmp_path / "store.zarr"
    summary = run_ingest(store, [str(root / "frames" / "*.fits")], catalog=catalog)
    assert summary["ingested_now"] == len(frames)
    assert summary["quarantined_now"] == 0
    cat = read_catalog(catalog)
    assert_store_matches_frames(store, frames, np.asarray(cat["source_id"]))

    import xarray as xr

    ds = xr.open_zarr(store)
    assert ds["mag"].dims == ("frame", "source", "photometry")
    assert ds["mag_err"].dims == ("frame", "source", "photometry")
    for coord in ("frame_id", "time", "source_id"):
        assert coord in ds.coords
    assert ds.sizes["photometry"] == 3
    assert ds.sizes["frame"] == len(frames)
    # Times are the frames' JD, ids exact 64-bit integers.
    jd = {str(f): t for f, t in zip(ds.frame_id.values, ds.time.values, strict=True)}
    for path in frames[:5]:
        with fits.open(path) as hdul:
            assert jd[hdul[1].header["FRAMEID"]] == hdul[1].header["JD"]
    assert ds.source_id.dtype == np.uint64
    assert set(np.asarray(cat["source_id"]).tolist()) <= set(int(v) for v in ds.source_id.values)
    # Stars seen in frames but missing from the catalog are on the source axis, flagged.
    assert (~ds.in_catalog.values).sum() > 0


def test_rerun_does_no_work_and_new_frames_only(prefect_server, field, tmp_path):
    root, frames, catalog = field
    store = tmp_path / "store.zarr"
    first, rest = frames[:25], frames[25:]
    s1 = run_ingest(store, [str(p) for p in first], catalog=catalog)
    assert s1["ingested_now"] == 25

    chunk_files = sorted((store / "mag").rglob("c/*/*/*"))
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files}
    s2 = run_ingest(store, [str(p) for p in first], catalog=catalog)
    assert s2["ingested_now"] == 0 and s2["skipped"] == 25
    assert {p: p.stat().st_mtime_ns for p in chunk_files} == mtimes, "a re-run rewrote data"
    assert s2["content_version"] == s1["content_version"]

    s3 = run_ingest(store, [str(p) for p in frames], catalog=catalog)
    assert s3["ingested_now"] == len(rest) and s3["skipped"] == 25
    assert s3["content_version"] != s1["content_version"]
    assert_store_matches_frames(store, frames)

    clean = tmp_path / "clean.zarr"
    run_ingest(clean, [str(p) for p in frames], catalog=catalog)
    a, b = store_by_ids(store), store_by_ids(clean)
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            np.testing.assert_array_equal(x, y)


def test_reingesting_a_changed_frame_overwrites_its_slot(prefect_server, field, tmp_path):
    root, frames, catalog = field
    store = tmp_path / "store.zarr"
    run_ingest(store, [str(p) for p in frames[:10]], catalog=catalog)
    table = Table.read(frames[3])
    table["mag"][:, 0] += 1.0
    time.sleep(0.01)
    table.write(frames[3], overwrite=True)
    s = run_ingest(store, [str(p) for p in frames[:10]], catalog=catalog)
    assert s["ingested_now"] == 1
    assert open_store(store)["frame_id"].shape == (10,)
    assert_store_matches_frames(store, frames[:10])


KILL_SCRIPT = """
import sys
from flows.ingest import run_ingest
run_ingest(sys.argv[1], sys.argv[2:-1], catalog=sys.argv[-1], max_workers=1, frames_per_chunk=1)
"""


def test_sigkill_midway_then_rerun_equals_clean_run(prefect_server, field, tmp_path):
    root, frames, catalog = field
    store = tmp_path / "killed.zarr"
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(store), *map(str, frames), str(catalog)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it once some, but not all, frames are written.
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = zarr.open_group(str(store), mode="r")["frame_state"][:]
        except Exception:  # store not created yet
            time.sleep(0.05)
            continue
        done = int((state == INGESTED).sum())
        if 3 <= done < len(frames):
            proc.send_signal(signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None, "the ingestion finished before it could be killed"

    s = run_ingest(store, [str(p) for p in frames], catalog=catalog)
    assert s["frames_in_store"] == len(frames)
    assert s["skipped"] >= killed_at
    clean = tmp_path / "clean.zarr"
    run_ingest(clean, [str(p) for p in frames], catalog=catalog)
    a, b = store_by_ids(store), store_by_ids(clean)
    assert a.keys() == b.keys()  # no duplicates, no holes
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------------
# Bad input (SPEC 8): each case names the file and the problem, is quarantined, good frames are kept.
# --------------------------------------------------------------------------------------------------


def _rewrite(path, mutate):
    table = Table.read(path)
    table = mutate(table) or table
    table.write(path, overwrite=True)


def _make_bad_frames(frames, catalog):
    """Damage a few frames in place; return {path: expected words in the reason}."""
    bad = {}
    # Truncated FITS.
    data = frames[0].read_bytes()
    frames[0].write_bytes(data[: len(data) // 3])
    bad[frames[0]] = "truncated FITS file"
    # Not a FITS file at all.
    frames[1].write_text("this is not a table\n")
    bad[frames[1]] = "not a FITS file"
    # Missing column.
    _rewrite(frames[2], lambda t: t.remove_column("mag_err"))
    bad[frames[2]] = "missing column 'mag_err'"

    # Wrong number of photometries.
    def wrong_p(t):
        t["mag"] = t["mag"][:, :2]
        t["mag_err"] = t["mag_err"][:, :2]

    _rewrite(frames[3], wrong_p)
    bad[frames[3]] = "has 2 photometries, the store has 3"

    # Duplicate source ids.
    def dupes(t):
        t["source_id"][1] = t["source_id"][0]

    _rewrite(frames[4], dupes)
    bad[frames[4]] = "duplicate source_id"

    # All-NaN frame.
    def all_nan(t):
        t["mag"][:] = np.nan

    _rewrite(frames[5], all_nan)
    bad[frames[5]] = "no valid measurement"

    # No star of the catalog.
    def unknown(t):
        t["source_id"] = np.arange(1, len(t) + 1, dtype=np.int64)

    _rewrite(frames[6], unknown)
    bad[frames[6]] = "no star of the catalog"

    # Non-integer ids.
    def float_ids(t):
        t["source_id"] = t["source_id"].astype(float)

    _rewrite(frames[7], float_ids)
    bad[frames[7]] = "must be integer"
    return bad


def test_bad_frames_are_quarantined_with_clear_reasons(prefect_server, field, tmp_path):
    root, frames, catalog = field
    bad = _make_bad_frames(frames, catalog)
    missing = root / "frames" / "does-not-exist.fits"
    bad[missing] = "does not exist"
    store = tmp_path / "store.zarr"
    summary = run_ingest(store, [str(p) for p in frames] + [str(missing)], catalog=catalog)
    reasons = {q["path"]: q["reason"] for q in summary["quarantined"]}
    for path, words in bad.items():
        assert str(path) in reasons, f"{path} not quarantined"
        assert words in reasons[str(path)], (path, reasons[str(path)])
    good = [p for p in frames if p not in bad]
    assert summary["ingested_now"] == len(good)
    assert_store_matches_frames(store, good)
    # The store's frame table lists them too (it feeds the INMASTER HDU), and a re-run does not retry
    # unchanged bad files.
    from photref_core.store.frames import frame_table

    table = frame_table(store)
    listed = {row["path"]: row for row in table}
    for path in bad:
        assert listed[str(path)]["state"] == "quarantined"
    again = run_ingest(store, [str(p) for p in frames] + [str(missing)], catalog=catalog)
    assert again["ingested_now"] == 0


def test_strict_mode_fails_the_run(prefect_server, field, tmp_path):
    root, frames, catalog = field
    _rewrite(frames[2], lambda t: t.remove_column("mag_err"))
    with pytest.raises(BadInputError, match=rf"{frames[2].name}: missing column 'mag_err'"):
        run_ingest(tmp_path / "s.zarr", [str(p) for p in frames], catalog=catalog, strict=True)
    _rewrite(frames[2], lambda t: t.add_column(t["mag"] * 0 + 0.01, name="mag_err"))

    def all_nan(t):
        t["mag"][:] = np.nan

    _rewrite(frames[5], all_nan)
    with pytest.raises(BadInputError, match=rf"{frames[5].name}: has no valid measurement"):
        run_ingest(tmp_path / "s2.zarr", [str(p) for p in frames], catalog=catalog, strict=True)


def test_other_schema_version_and_non_store_refused(field, tmp_path):
    root, frames, catalog = field
    store = tmp_path / "old.zarr"
    group = zarr.open_group(str(store), mode="w")
    group.attrs["photref_schema"] = 0
    with pytest.raises(StoreError, match="schema version 0"):
        open_dataset(store)
    from photref_core.ingest.photometry import plan_ingestion

    with pytest.raises(StoreError, match="schema version 0"):
        plan_ingestion(store, frames, catalog=read_catalog(catalog))
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(2,), dtype="f8")
    with pytest.raises(StoreError, match="not a photref store"):
        plan_ingestion(other, frames, catalog=read_catalog(catalog))


def test_store_creation_killed_half_way_is_redone(field, tmp_path, monkeypatch):
    """A run killed inside the store's creation (arrays made, schema attributes not yet written) left a
    store the next run refused as foreign (seen in the SIGKILL reliability test); it is created again."""
    from photref_core.ingest.photometry import plan_ingestion
    from photref_core.store import schema

    root, frames, catalog = field
    store = tmp_path / "half.zarr"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed inside create_store")

    with monkeypatch.context() as m:
        m.setattr(schema, "create_frame_axis", killed)
        with pytest.raises(KeyboardInterrupt):
            schema.create_store(str(store), 3, "f8", 8)
    half = zarr.open_group(str(store), mode="r")
    assert "mag" in half and "photref_schema" not in half.attrs
    plan_ingestion(store, frames, catalog=read_catalog(catalog))
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["photref_schema"] == schema.SCHEMA_VERSION
    assert "photref_creating" not in group.attrs


def test_bad_catalogs(tmp_path):
    empty = tmp_path / "empty.fits"
    Table({"source_id": np.zeros(0, np.int64), "ra": np.zeros(0)}).write(empty)
    with pytest.raises(BadInputError, match="empty.fits: catalog is empty"):
        read_catalog(empty)
    noid = tmp_path / "noid.fits"
    Table({"ra": np.zeros(3)}).write(noid)
    with pytest.raises(BadInputError, match="noid.fits: catalog has no 'source_id'"):
        read_catalog(noid)
    dup = tmp_path / "dup.fits"
    Table({"source_id": np.array([1, 1, 2]), "ra": np.zeros(3)}).write(dup)
    with pytest.raises(BadInputError, match="dup.fits: duplicate source_id in the catalog"):
        read_catalog(dup)
    with pytest.raises(BadInputError, match="nothere.fits: catalog file does not exist"):
        read_catalog(tmp_path / "nothere.fits")


def test_reader_formats_and_time_keywords(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([2**63 + 11, 5, 7_000_000_000_000_000_123], dtype=np.uint64)
    mag = rng.normal(12, 1, (3, 2))
    err = rng.uniform(0.01, 0.02, (3, 2))
    vector = Table({"source_id": ids, "mag": mag, "mag_err": err})
    vector.meta["MJD-OBS"] = 60000.25
    scalar = Table(
        {
            "source_id": ids,
            "mag_0": mag[:, 0],
            "mag_err_0": err[:, 0],
            "mag_1": mag[:, 1],
            "mag_err_1": err[:, 1],
        }
    )
    scalar.meta["DATE-OBS"] = "2024-01-01T12:00:00"
    scalar.meta["FRAMEID"] = "night1-0042"
    for name, table in {"v.fits": vector, "v.ecsv": vector, "s.parquet": scalar, "s.fits": scalar}.items():
        path = tmp_path / name
        table.write(path)
        frame = read_frame(path)
        assert frame.header.source_id.dtype == np.uint64
        assert [int(v) for v in frame.header.source_id] == [int(v) for v in ids]
        np.testing.assert_array_equal(frame.mag, mag)
        np.testing.assert_array_equal(frame.mag_err, err)
        assert frame.header.n_photometries == 2
        if name.startswith("v"):
            assert frame.header.time == 60000.25 + 2400000.5
            assert frame.header.frame_id == name.split(".")[0]
        elif name.endswith("fits"):  # parquet keeps no table meta through astropy
            assert frame.header.time == pytest.approx(2460311.0, abs=1e-9)
            assert frame.header.frame_id == "night1-0042"
    missing = Table({"source_id": ids, "mag_0": mag[:, 0], "mag_err_0": err[:, 0], "mag_1": mag[:, 1]})
    missing.write(tmp_path / "m.fits")
    with pytest.raises(BadInputError, match=r"m.fits: missing column\(s\) mag_err_1"):
        read_frame(tmp_path / "m.fits")


def test_transient_io_errors_are_retried(prefect_server, field, tmp_path, monkeypatch):
    """An EIO on a frame read fails the chunk task; Prefect retries it and the run completes."""
    import errno

    import photref_core.ingest.photometry as core_photometry
    import tasks.ingest as ingest_tasks

    root, frames, catalog = field
    calls = {"n": 0, "failed": 0}
    real = core_photometry.ingest_batch

    def flaky(store, batch, strict=False):
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            calls["failed"] += 1
            raise OSError(errno.EIO, "Input/output error (injected)", batch.paths[0])
        return real(store, batch, strict=strict)

    monkeypatch.setattr(ingest_tasks.photometry, "ingest_batch", flaky)
    store = tmp_path / "store.zarr"
    summary = run_ingest(store, [str(p) for p in frames], catalog=catalog)
    assert summary["ingested_now"] == len(frames)
    fpc = open_store(store).attrs["frames_per_chunk"]
    n_batches = -(-len(frames) // fpc)
    assert calls["failed"] >= 1
    assert calls["n"] == n_batches + calls["failed"]  # every failed chunk ran again, and only those
    assert_store_matches_frames(store, frames)


def test_quarantined_state_recorded(prefect_server, field, tmp_path):
    root, frames, catalog = field

    def all_nan(t):
        t["mag_err"][:] = -1

    _rewrite(frames[5], all_nan)
    store = tmp_path / "store.zarr"
    run_ingest(store, [str(p) for p in frames], catalog=catalog)
    contents = store_by_ids(store)
    fid = Table.read(frames[5]).meta["FRAMEID"]
    assert contents[fid][3] == QUARANTINED
    assert np.isnan(contents[fid][1]).all()


LOCK_HOLDER = """
import sys, time
from photref_core.store.lock import store_lock
with store_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_on_a_locked_store_is_refused_then_proceeds(prefect_server, field, tmp_path):
    """Another process holds the store: a run refuses at once; once the holder dies (SIGKILL), it runs."""
    root, frames, catalog = field
    store = tmp_path / "store.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(store)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="another photref run is using this store"):
            run_ingest(store, [str(p) for p in frames], catalog=catalog)
        assert not store.exists()  # refused before touching anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    summary = run_ingest(store, [str(p) for p in frames], catalog=catalog)
    assert summary["ingested_now"] == len(frames)


def test_a_transient_read_error_is_retried_for_that_frame_only(field, tmp_path):
    """ingest_batch retries the one read that failed (EIO) instead of failing the whole chunk."""
    import errno

    from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion

    root, frames, catalog = field
    failed = set()

    def flaky_reader(path):
        if path not in failed:
            failed.add(path)
            raise OSError(errno.EIO, "Input/output error (injected)", path)
        return read_frame(path)

    store = tmp_path / "s.zarr"
    plan = plan_ingestion(store, frames, catalog=read_catalog(catalog))
    results = [r for b in plan.batches for r in ingest_batch(store, b, reader=flaky_reader)]
    finalize_ingestion(store, results)
    assert len(failed) == len(frames) and all(r.reason is None for r in results)
    assert_store_matches_frames(store, frames)
    # A bad file is not retried: it is quarantined at once.
    frames[0].write_text("not a table")
    calls = []

    def counting_reader(path):
        calls.append(path)
        return read_frame(path)

    plan = plan_ingestion(tmp_path / "t.zarr", frames[1:], catalog=read_catalog(catalog))
    from photref_core.store.frames import FrameBatch

    batch = FrameBatch(chunk=0, slots=[0], paths=[str(frames[0])], frame_ids=["x"])
    (result,) = ingest_batch(tmp_path / "t.zarr", batch, reader=counting_reader)
    assert result.reason.startswith("not a FITS file") and calls == [str(frames[0])]


def _ingest_plain(store, paths, catalog):
    """Ingestion without Prefect (the core calls the flow makes)."""
    from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion

    plan = plan_ingestion(store, paths, catalog=catalog)
    return finalize_ingestion(store, [r for batch in plan.batches for r in ingest_batch(store, batch)])


def test_ingestion_needed_is_false_only_when_a_run_would_change_nothing(field, tmp_path):
    from photref_core.ingest.photometry import ingestion_needed, plan_ingestion

    root, frames, catalog_path = field
    catalog = read_catalog(catalog_path)
    store = tmp_path / "s.zarr"
    paths = [str(p) for p in frames[:-1]]
    assert ingestion_needed(store, paths, catalog)  # no store yet
    _ingest_plain(store, paths, catalog)
    assert not ingestion_needed(store, paths, catalog)
    assert not ingestion_needed(store, paths[:5], catalog)  # a subset of what is in the store
    assert not ingestion_needed(store, paths, None)

    assert ingestion_needed(store, [str(p) for p in frames], catalog)  # a new frame
    assert ingestion_needed(store, paths + [str(root / "missing.fits")], catalog)  # to report it
    os.utime(frames[0], ns=(time.time_ns(), time.time_ns()))  # a changed file
    assert ingestion_needed(store, paths, catalog)
    _ingest_plain(store, paths, catalog)
    assert not ingestion_needed(store, paths, catalog)

    # A catalog with one more star, or one star fewer: the source axis or in_catalog would change.
    extra = catalog.copy()
    extra.add_row(extra[0])
    extra["source_id"][-1] = int(extra["source_id"].max()) + 1
    assert ingestion_needed(store, paths, extra)
    assert ingestion_needed(store, paths, catalog[1:])

    # A quarantined frame, unchanged since, is not read again.
    Path(paths[3]).write_bytes(b"not a FITS file")
    _ingest_plain(store, paths, catalog)
    assert open_store(store).attrs["quarantine"][paths[3]]["reason"]
    assert not ingestion_needed(store, paths, catalog)

    # A plan killed before it committed its axes: the next plan must clean up.
    group = zarr.open_group(str(store), mode="r+")
    group["frame_id"].resize((group["frame_id"].shape[0] + 4,))
    assert ingestion_needed(store, paths, catalog)
    plan_ingestion(store, paths, catalog=catalog)
    assert not ingestion_needed(store, paths, catalog)


def test_frame_states_come_from_the_copy_only_while_it_is_current(field, tmp_path):
    """The finaliser's one-chunk copy of the markers is read while its tag is the content version; a
    plan clears the tag, so a running or killed ingestion is seen through the markers themselves."""
    from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion
    from photref_core.store.frames import frame_states

    root, frames, catalog_path = field
    catalog = read_catalog(catalog_path)
    store = tmp_path / "s.zarr"
    paths = [str(p) for p in frames]
    _ingest_plain(store, paths[:-3], catalog)
    group = open_store(store)
    assert group.attrs["frame_state_copy"] == group.attrs["content_version"]
    markers = group["frame_state"][:]
    assert (markers == INGESTED).all() and np.array_equal(frame_states(group), markers)

    # The fast path really reads the copy: a (deliberately) different copy shows through while tagged.
    zarr.open_group(str(store), mode="r+")["frame_state_copy"][0] = QUARANTINED
    assert frame_states(open_store(store))[0] == QUARANTINED
    zarr.open_group(str(store), mode="r+")["frame_state_copy"][0] = INGESTED

    plan = plan_ingestion(store, paths, catalog=catalog)  # three new frames, pending
    group = open_store(store)
    assert group.attrs["frame_state_copy"] is None
    assert list(frame_states(group)) == [INGESTED] * (len(paths) - 3) + [0] * 3
    ingest_batch(store, plan.batches[-1])  # killed after one writer: no finaliser
    assert np.array_equal(frame_states(open_store(store)), open_store(store)["frame_state"][:])
    assert np.array_equal(frame_states(open_store(store), 2), open_store(store)["frame_state"][:2])

    results = [
        r
        for batch in plan_ingestion(store, paths, catalog=catalog).batches
        for r in ingest_batch(store, batch)
    ]
    finalize_ingestion(store, results)
    group = open_store(store)
    assert group.attrs["frame_state_copy"] == group.attrs["content_version"]
    assert (frame_states(group) == INGESTED).all() and frame_states(group).size == len(paths)
