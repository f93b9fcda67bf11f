"""Scale-out: flows on an existing Dask `distributed` cluster (LocalCluster on loopback), fsspec stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits


@pytest.fixture
def field(small_field, tmp_path):
    dst = tmp_path / "field"
    shutil.copytree(Path(small_field.catalog).parent, dst)
    return dst, sorted((dst / "frames").glob("*.fits")), dst / "catalog.fits"


def assert_same_master(a, b):
    with fits.open(a) as ha, fits.open(b) as hb:
        assert len(ha) == len(hb)
        for x, y in zip(ha[1:], hb[1:], strict=True):
            for name in x.columns.names:
                if name == "path":
                    continue
                np.testing.assert_array_equal(x.data[name], y.data[name])
        for key in ("NFRAMES", "FITTERMS", "STATTHR"):
            assert ha[0].header[key] == hb[0].header[key]


def test_flows_on_a_dask_cluster_match_local_threads(prefect_server, field, tmp_path):
    from distributed import LocalCluster

    from flows.master_photref import run_master

    root, frames, catalog = field
    glob = [str(root / "frames" / "*.fits")]
    local = run_master(tmp_path / "local.zarr", catalog, tmp_path / "local.fits", frames=glob, max_workers=2)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        remote = run_master(
            tmp_path / "dask.zarr",
            catalog,
            tmp_path / "dask.fits",
            frames=glob,
            dask_address=cluster.scheduler_address,
            block_mib=0.05,  # several source blocks, so they spread over the cluster
        )
        from distributed import Client

        with Client(cluster) as client:
            prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    # The Prefect tasks and the statistics' source blocks both ran on the cluster.
    for name in (
        "ingest_batch",
        "compute_statistics",
        "block_statistics",
        "fit_statistics",
        "write_products",
    ):
        assert name in prefixes, prefixes
    assert remote["photometries"] == local["photometries"]
    assert_same_master(local["master"], remote["master"])


def test_memory_fsspec_store(prefect_server, field, tmp_path):
    """A non-local fsspec store (memory://) works for ingestion and the master."""
    from flows.master_photref import run_master
    from photref_core.store.schema import open_dataset

    root, frames, catalog = field
    glob = [str(root / "frames" / "*.fits")]
    url = "memory://photref-test/field.zarr"
    mem = run_master(url, catalog, tmp_path / "mem.fits", frames=glob, max_workers=2)
    disk = run_master(tmp_path / "disk.zarr", catalog, tmp_path / "disk.fits", frames=glob, max_workers=2)
    assert open_dataset(url).sizes["frame"] == len(frames)
    assert mem["photometries"] == disk["photometries"]
    assert_same_master(mem["master"], disk["master"])
    with fits.open(mem["master"]) as hdul:
        assert hdul[0].header["STORE"] == url
