"""Consolidated metadata (issue 11 item 4): a plain ``xr.open_zarr(store)`` is silent and current after
every run that changed the store; a run that stops half-way leaves none, never a stale copy."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr

from photref_core.catalog import read_catalog
from photref_core.ingest.photometry import plan_ingestion
from photref_core.store import drop_consolidated, is_consolidated, store_run


def _plain_open(store, **kw) -> xr.Dataset:
    """``xr.open_zarr`` as a newcomer types it, with every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(str(store), **kw)


def test_every_run_that_changes_the_store_leaves_current_consolidated_metadata(
    prefect_server, small_field, tmp_path
):
    from flows.ingest import run_ingest
    from flows.master_photref import run_master

    frames = sorted(str(p) for p in small_field.frames)
    store = tmp_path / "s.zarr"
    run_ingest(store, frames[:30], catalog=str(small_field.catalog))
    assert is_consolidated(str(store))
    first = _plain_open(store)
    assert first.sizes["frame"] == 30

    # More frames: the copy follows the store (a stale one would still say 30 frames).
    run_ingest(store, frames, catalog=str(small_field.catalog))
    ds = _plain_open(store)
    exact = xr.open_zarr(str(store), consolidated=False)
    assert ds.sizes == exact.sizes and ds.sizes["frame"] == 40
    assert ds.attrs == exact.attrs
    np.testing.assert_array_equal(ds.mag.values, exact.mag.values)

    # The master's result groups open plainly too (they are in the root's copy).
    run_master(store, small_field.catalog, tmp_path / "m.fits")
    listed = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    groups = [k for k in listed if k.count("/") == 1 and k.startswith("results/")]
    assert {k.split("-")[0] for k in groups} == {"results/statistics", "results/fit"}
    for group in groups:
        plain = _plain_open(store, group=group)
        assert plain.identical(xr.open_zarr(str(store), group=group, consolidated=False))

    # A cached re-run changes nothing, so it does not rewrite the copy.
    before = (store / "zarr.json").stat().st_mtime_ns
    run_master(store, small_field.catalog, tmp_path / "m.fits")
    assert (store / "zarr.json").stat().st_mtime_ns == before


def test_a_run_stopped_half_way_leaves_none(small_field, tmp_path):
    frames = sorted(str(p) for p in small_field.frames)
    store = tmp_path / "s.zarr"
    catalog = read_catalog(small_field.catalog)
    # What a run killed after its plan looks like: the planner changed the axes, no finaliser ran.
    with store_run(store):
        plan_ingestion(store, frames[:10], catalog)
    assert is_consolidated(str(store))
    plan_ingestion(store, frames, catalog)
    assert not is_consolidated(str(store))
    with pytest.raises((KeyError, ValueError, FileNotFoundError)):
        xr.open_zarr(str(store), consolidated=True)  # nothing stale to be read
    # The plain call still works (it warns and reads what is on disk).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert xr.open_zarr(str(store)).sizes["frame"] == 40


def test_store_run_consolidates_once_at_the_outermost_exit_and_never_after_a_failure(small_field, tmp_path):
    frames = sorted(str(p) for p in small_field.frames)
    store = tmp_path / "s.zarr"
    catalog = read_catalog(small_field.catalog)
    with store_run(store):
        with store_run(store):  # a subflow's hold: its exit leaves consolidation to the parent
            plan_ingestion(store, frames[:10], catalog)
        assert not is_consolidated(str(store))
    assert is_consolidated(str(store))

    with pytest.raises(RuntimeError), store_run(store):
        plan_ingestion(store, frames[:20], catalog)
        raise RuntimeError("killed")
    assert not is_consolidated(str(store))
    assert drop_consolidated(str(store)) is False  # nothing left to drop
