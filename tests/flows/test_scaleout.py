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


def _children_running(pid: int, needle: str) -> list[str]:
    """Command lines of the live descendants of ``pid`` that contain ``needle`` (read from /proc)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        found += [commands[p] for p in frontier if needle in commands.get(p, "")]
    return found


def _cli_env(tmp_path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def test_dask_worker_processes_report_to_the_runs_temporary_server(prefect_server, field, tmp_path):
    """`photref master --dask-address` on the temporary server, against a real `dask scheduler` and two
    `dask worker` processes: the same master as local threads, and no worker starts a Prefect server of
    its own (each did, costing ~20 s a worker, before the run named its server to them)."""
    import subprocess
    import sys
    import time

    from flows.master_photref import run_master

    root, frames, catalog = field
    bindir = Path(sys.executable).parent
    scheduler_file = tmp_path / "scheduler.json"
    env = _cli_env(tmp_path)
    procs = [
        subprocess.Popen(
            [
                bindir / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                scheduler_file,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        procs += [
            subprocess.Popen(
                [
                    bindir / "dask",
                    "worker",
                    "--scheduler-file",
                    scheduler_file,
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        import json

        address = json.loads(scheduler_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        done = subprocess.run(
            [
                bindir / "photref",
                "master",
                tmp_path / "dask.zarr",
                "--catalog",
                catalog,
                "--output",
                tmp_path / "dask.fits",
                "--frames",
                str(root / "frames" / "*.fits"),
                "--dask-address",
                address,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "temporary" in done.stderr  # the one-line hint
        for worker in procs[1:]:
            assert _children_running(worker.pid, "uvicorn") == []
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    local = run_master(
        tmp_path / "local.zarr", catalog, tmp_path / "local.fits", frames=[str(root / "frames" / "*.fits")]
    )
    assert_same_master(local["master"], tmp_path / "dask.fits")


def test_dask_workers_elsewhere_are_refused_on_the_temporary_server(field, tmp_path):
    import subprocess
    import sys

    root, frames, catalog = field
    done = subprocess.run(
        [
            Path(sys.executable).parent / "photref",
            "master",
            tmp_path / "s.zarr",
            "--catalog",
            catalog,
            "--output",
            tmp_path / "m.fits",
            "--dask-address",
            "tcp://192.0.2.7:8786",
        ],
        env=_cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "192.0.2.7" in done.stderr and "PREFECT_API_URL" in done.stderr
    assert not (tmp_path / "s.zarr").exists()  # refused before any work
