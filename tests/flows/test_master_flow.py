"""The master-photref flow end to end on a real Prefect server: products, rules, caching, bad input."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from pydantic import ValidationError

from photref_core.errors import FitTermsError
from photref_core.master.fits import read_master
from photref_core.master.parameters import MasterParameters
from photref_core.master.stats import RejectionParameters, enough_flags, source_statistics
from photref_core.master.steps import load_results
from photref_core.store.schema import open_store


@pytest.fixture
def field(small_field, tmp_path):
    dst = tmp_path / "field"
    shutil.copytree(Path(small_field.catalog).parent, dst)
    return dst, sorted((dst / "frames").glob("*.fits")), dst / "catalog.fits"


# Task runs that check the store (whether to ingest, whether a cached result is still there): never cached.
CHECKS = ("new frames? ", "check ")


def run(store, catalog, output, **kw):
    from flows.master_photref import build_master_photref

    return build_master_photref(store=str(store), catalog=str(catalog), output=str(output), **kw)


def task_runs(flow_run_id) -> list[tuple[str, str]]:
    """(task name, state name) of a flow run's task runs in start order, read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            )
            return [(r.name, r.state.name) for r in runs]

    return asyncio.run(read())


def task_states(flow_run_id) -> dict[str, str]:
    """{task name: state name} of a flow run's task runs (the last run of a name wins)."""
    return dict(task_runs(flow_run_id))


def subflow_names(flow_run_id) -> list[str]:
    """Names of the subflow runs of a flow run, read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
                )
            )
            return sorted(r.name for r in runs)

    return asyncio.run(read())


def run_with_state(store, catalog, output, **kw):
    from flows.master_photref import build_master_photref

    state = build_master_photref(
        store=str(store), catalog=str(catalog), output=str(output), return_state=True, **kw
    )
    return state.result(), task_states(state.state_details.flow_run_id), state.state_details.flow_run_id


def test_master_products_follow_the_spec(prefect_server, field, tmp_path):
    root, frames, catalog = field
    # One frame with no valid measurement: quarantined, listed in INMASTER as not included.
    from astropy.table import Table

    bad = Table.read(frames[0])
    bad["mag"][:] = np.nan
    bad.write(frames[0], overwrite=True)
    store, output = tmp_path / "s.zarr", tmp_path / "out" / "master.fits"
    output.parent.mkdir()
    products = run(
        store, catalog, output, frames=[str(root / "frames" / "*.fits")], extra_header={"OBSERVAT": "demo"}
    )
    assert Path(products["master"]) == output
    assert Path(products["statistics"]).name == "master_stat.fits"
    assert all(Path(p).exists() for p in products["plots"])

    # Statistics equal the in-memory computation on the ingested frames.
    group = open_store(store)
    state = group["frame_state"][:]
    mag, err = group["mag"][:][state == 1], group["mag_err"][:][state == 1]
    expected = source_statistics(mag, err, RejectionParameters())
    results = load_results(store, products_groups(store)["statistics"], products_groups(store)["fit"])
    for name in ("full_count", "rejected_count", "magnitude", "mediandev", "medianmeddev", "mag_err"):
        np.testing.assert_array_equal(results[name].values, expected[name].values)
    np.testing.assert_array_equal(
        results["enough"].values,
        enough_flags(expected["rejected_count"].values, full_count=expected["full_count"].values),
    )

    # The inclusion rule, recomputed here from the stored excess.
    excess = results["scatter_excess"].values
    in_catalog = results["in_catalog"].values
    master = read_master(output)
    for p, table in enumerate(master["photometries"]):
        finite = np.isfinite(excess[:, p])
        cut = 3.0 * np.median(np.abs(excess[finite, p]))
        rule = results["enough"].values[:, p] & (excess[:, p] <= cut) & in_catalog
        ids = np.sort(results["source_id"].values[rule])
        np.testing.assert_array_equal(np.asarray(table["source_id"], dtype=np.uint64), ids)
        assert not np.isin(results["source_id"].values[~in_catalog], table["source_id"]).any()
        row = {int(s): i for i, s in enumerate(results["source_id"].values)}
        k = np.array([row[int(s)] for s in table["source_id"]])
        np.testing.assert_array_equal(table["magnitude"], results["magnitude"].values[k, p])
        np.testing.assert_array_equal(table["mag_err"], results["mag_err"].values[k, p])

    with fits.open(output) as hdul:
        h = hdul[0].header
        assert h["OBSERVAT"] == "demo"
        assert h["FITTERMS"] == "O2{phot_g_mean_mag}"
        assert h["NFRAMES"] == len(frames) - 1
        assert h["STATCEN"] == "median" and h["STATUNIT"] == "meddev" and h["SCATQTY"] == "medianmeddev"
        assert [x.name for x in hdul[1:]] == ["MPHOTREF"] * 3 + ["INMASTER"]
    inmaster = master["frames"]
    assert len(inmaster) == len(frames)
    excluded = inmaster[~np.asarray(inmaster["included"], bool)]
    assert list(excluded["path"]) == [str(frames[0])]

    # The statistics table: every star, sorted, with the catalog columns.
    stat = Table.read(products["statistics"])
    assert len(stat) == results.sizes["source"]
    assert np.all(np.diff(np.asarray(stat["source_id"], dtype=np.uint64).astype(float)) >= 0)
    assert "phot_g_mean_mag" in stat.colnames and stat["magnitude"].shape[1] == 3


def products_groups(store) -> dict:
    import zarr

    g = zarr.open_group(str(store), mode="r")["results"]
    names = sorted(g.group_keys())
    return {
        "statistics": "results/" + next(n for n in names if n.startswith("statistics-")),
        "fit": "results/" + next(n for n in names if n.startswith("fit-")),
    }


def test_caching_unchanged_new_frame_and_changed_threshold(prefect_server, field, tmp_path):
    root, frames, catalog = field
    store, output = tmp_path / "s.zarr", tmp_path / "master.fits"
    first = [str(p) for p in frames[:-1]]
    p1, states1, run1 = run_with_state(store, catalog, output, frames=first)
    assert states1["statistics " + store.name] == "Completed"
    assert subflow_names(run1) == [f"ingest {store.name}"]
    mtime = output.stat().st_mtime_ns

    # Unchanged: every step cached, the master untouched, no ingestion subflow (nothing to ingest).
    p2, states2, run2 = run_with_state(store, catalog, output, frames=first)
    run_facts = ("cached", "ingestion")  # what this run did, beside the products
    assert {k: v for k, v in p2.items() if k not in run_facts} == {
        k: v for k, v in p1.items() if k not in run_facts
    }
    assert (p1["cached"], p2["cached"], p2["ingestion"]) == (False, True, None)
    assert states2["statistics " + store.name] == "Cached"
    assert states2[f"write {output.name}"] == "Cached"
    assert output.stat().st_mtime_ns == mtime
    assert subflow_names(run2) == []

    # A changed fit threshold: statistics cached, fit and products run again.
    p3, states3, _ = run_with_state(
        store, catalog, output, frames=first, params=MasterParameters(fit_outlier_threshold=2.5)
    )
    assert states3["statistics " + store.name] == "Cached"
    assert [v for k, v in states3.items() if k.startswith("scatter fit")] == ["Completed"]
    assert states3[f"write {output.name}"] == "Completed"
    with fits.open(output) as hdul:
        assert hdul[0].header["OUTL_THR"] == 2.5

    # A new frame: statistics recomputed (test_ingest shows that only the new frame is read).
    p4, states4, run4 = run_with_state(store, catalog, output, frames=[str(p) for p in frames])
    assert states4["statistics " + store.name] == "Completed"
    assert subflow_names(run4) == [f"ingest {store.name}"]
    assert read_master(output)["header"]["NFRAMES"] == len(frames)

    # A deleted product is written again even though the step is cached.
    Path(p4["statistics"]).unlink()
    p5 = run(store, catalog, output, frames=[str(p) for p in frames])
    assert Path(p5["statistics"]).exists()


def test_cache_never_hands_back_a_master_overwritten_by_other_parameters(prefect_server, field, tmp_path):
    """Two runs with different thresholds to one output, then the first again: the first's products are
    in the cache, but the file on disk is the second's, so the step runs again and the file is right."""
    root, frames, catalog = field
    store, output = tmp_path / "s.zarr", tmp_path / "master.fits"
    paths = [str(p) for p in frames]
    run_with_state(store, catalog, output, frames=paths, params=MasterParameters(fit_outlier_threshold=3.0))
    _, states, _ = run_with_state(
        store, catalog, output, frames=paths, params=MasterParameters(fit_outlier_threshold=4.0)
    )
    assert states[f"write {output.name}"] == "Completed"
    with fits.open(output) as hdul:
        assert hdul[0].header["OUTL_THR"] == 4.0
    again, states, run_id = run_with_state(
        store, catalog, output, frames=paths, params=MasterParameters(fit_outlier_threshold=3.0)
    )
    assert states["statistics " + store.name] == "Cached"  # what is still valid stays cached
    # The cached write was refused (the file is not the one it wrote) and the step ran again.
    assert [s for name, s in task_runs(run_id) if name == f"write {output.name}"] == ["Cached", "Completed"]
    with fits.open(output) as hdul:
        assert hdul[0].header["OUTL_THR"] == 3.0
    # And now unchanged: served from the cache, the file untouched.
    mtime = output.stat().st_mtime_ns
    _, states, _ = run_with_state(
        store, catalog, output, frames=paths, params=MasterParameters(fit_outlier_threshold=3.0)
    )
    assert states[f"write {output.name}"] == "Cached"
    assert output.stat().st_mtime_ns == mtime


def test_relative_store_path_hits_the_cache_of_the_absolute_one(prefect_server, field, tmp_path, monkeypatch):
    root, frames, catalog = field
    paths = [str(p) for p in frames]
    monkeypatch.chdir(tmp_path)
    first, states, _ = run_with_state(tmp_path / "s.zarr", catalog, tmp_path / "m.fits", frames=paths)
    assert states["statistics s.zarr"] == "Completed"
    again, states, _ = run_with_state("s.zarr", catalog, "m.fits", frames=paths)
    steps = {k: v for k, v in states.items() if not k.startswith(CHECKS)}
    assert steps == {k: "Cached" for k in steps} and steps
    assert {k: v for k, v in again.items() if k not in ("cached", "ingestion")} == {
        k: v for k, v in first.items() if k not in ("cached", "ingestion")
    }


def test_bad_fit_terms_fail_before_any_work(prefect_server, field, tmp_path):
    root, frames, catalog = field
    store = tmp_path / "never.zarr"
    with pytest.raises(FitTermsError, match="no_such_column"):
        run(
            store,
            catalog,
            tmp_path / "m.fits",
            frames=[str(p) for p in frames],
            params=MasterParameters(fit_terms="O2{no_such_column}"),
        )
    assert not store.exists()
    # A grammar error is refused when the parameters are built (a ValueError naming the field).
    with pytest.raises(ValidationError, match=r"fit_terms[\s\S]*__import__"):
        run(
            store,
            catalog,
            tmp_path / "m.fits",
            frames=[str(p) for p in frames],
            params=MasterParameters(fit_terms="__import__('os').system('touch pwned')"),
        )
    assert not store.exists() and not Path("pwned").exists()


def test_bad_parameter_refused_by_the_flow(prefect_server, field, tmp_path):
    from prefect.exceptions import ParameterTypeError

    root, frames, catalog = field
    # The parameters as JSON (what a deployment or the UI sends) are validated by the flow.
    with pytest.raises(ParameterTypeError, match="rejection_center"):
        run(tmp_path / "s.zarr", catalog, tmp_path / "m.fits", params={"rejection_center": "mode"})


def test_dask_statistics_from_store_match_memory(field, tmp_path):
    """The out-of-core path through the store equals the in-memory statistics, with tiny blocks."""
    from photref_core.catalog import read_catalog
    from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion
    from photref_core.master.steps import compute_statistics

    root, frames, catalog = field
    store = tmp_path / "s.zarr"
    plan = plan_ingestion(store, frames, catalog=read_catalog(catalog))
    results = [r for b in plan.batches for r in ingest_batch(store, b)]
    finalize_ingestion(store, results)
    group_name = compute_statistics(store, MasterParameters(), block_bytes=4096)
    stats = xr.open_zarr(str(store), group=group_name).load()
    g = open_store(store)
    expected = source_statistics(g["mag"][:], g["mag_err"][:])
    for name in expected.data_vars:
        np.testing.assert_array_equal(stats[name].values, expected[name].values)


def test_runs_by_hand_have_no_heartbeat_unless_one_is_configured(prefect_server):
    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    from flows.runners import run_by_hand

    @flow
    def heartbeat_frequency():
        # What Prefect's flow engine reads when it starts the run's heartbeat thread (None: no thread).
        return get_current_settings().flows.heartbeat_frequency

    assert heartbeat_frequency() == 180  # the flow object itself: Prefect's default
    assert run_by_hand(heartbeat_frequency) is None
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):  # configured explicitly
        assert run_by_hand(heartbeat_frequency) == 60


def test_the_private_prefect_attribute_the_hand_runs_rely_on_exists():
    """flows.runners.api_client sets a private attribute of Prefect's SyncClientContext; an upgrade that
    removes it must fail here, loudly, not slow every hand run down in silence."""
    from prefect.context import SyncClientContext

    from flows.runners import PRIVATE_HTTPX_SETTINGS

    context = SyncClientContext(httpx_settings={"verify": True})
    assert hasattr(context, PRIVATE_HTTPX_SETTINGS), (
        f"Prefect's SyncClientContext has no {PRIVATE_HTTPX_SETTINGS} any more: find the public way for "
        "flows.runners.api_client to share one client"
    )
    assert getattr(context, PRIVATE_HTTPX_SETTINGS) == {"verify": True}


def test_hand_runs_share_one_client_setup_and_prefects_default_storage(prefect_server):
    """run_by_hand reuses Prefect's per-run objects: the run's client is the one every get_client() in it
    hands out, its TLS context is built once per process, and results go where Prefect's default would
    put them (so cache entries are shared with direct calls of the flows)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext, SyncClientContext
    from prefect.results import get_default_result_storage
    from prefect.settings import get_current_settings

    from flows.runners import _tls_context, run_by_hand

    @flow
    def client_and_storage():
        client = SyncClientContext.get().client
        storage = FlowRunContext.get().result_store.result_storage
        api = get_current_settings().api
        shared_tls = _tls_context(api.tls_insecure_skip_verify, api.ssl_cert_file)
        # httpx keeps the TLS context in its connection pool (pinned httpx 0.28).
        tls = client._client._transport._pool._ssl_context
        return get_client(sync_client=True) is client, tls is shared_tls, storage

    for _ in range(2):
        same_client, same_tls, storage = run_by_hand(client_and_storage)
        assert same_client and same_tls
    assert Path(storage.basepath) == Path(get_default_result_storage().basepath)
    assert client_and_storage()[2].basepath == storage.basepath  # the flow object, Prefect's own default
