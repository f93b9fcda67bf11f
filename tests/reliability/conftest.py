"""Fixtures of the reliability tests: the shared simulated field and one clean (undisturbed) run of the
master flow, the reference every disturbed run must reproduce.

The frames of ``small_field`` are never modified here (tests that need damaged files write new ones), so
every run reads the same paths and the INMASTER HDUs of a disturbed and a clean run can be compared as
they are.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Field:
    frames: list[str]
    catalog: str


@dataclass(frozen=True)
class CleanRun:
    store: str
    master: str
    statistics: str
    store_snapshot: dict
    n_photometries: int
    seconds: float  # wall time of the run (scales the random kill delays)


@pytest.fixture(scope="session")
def rel_field(small_field) -> Field:
    """The session's simulated field (40 frames x 300 stars x 3 photometries), read only."""
    return Field(frames=[os.fspath(p) for p in small_field.frames], catalog=os.fspath(small_field.catalog))


@pytest.fixture(scope="session")
def clean_run(prefect_server, rel_field, tmp_path_factory) -> CleanRun:
    """The master flow (ingestion included) run once, undisturbed, in this process."""
    from relutil import store_snapshot

    from flows.master_photref import build_master_photref

    root = tmp_path_factory.mktemp("clean")
    store, output = root / "store.zarr", root / "master.fits"
    start = time.perf_counter()
    products = build_master_photref(
        store=str(store), catalog=rel_field.catalog, output=str(output), frames=rel_field.frames, plots=False
    )
    seconds = time.perf_counter() - start
    snapshot = store_snapshot(store)
    n_phot = next(iter(snapshot["frames"].values()))[3].shape[1]
    return CleanRun(
        store=str(store),
        master=products["master"],
        statistics=products["statistics"],
        store_snapshot=snapshot,
        n_photometries=n_phot,
        seconds=seconds,
    )


@pytest.fixture(scope="session")
def launcher(prefect_server, tmp_path_factory):
    """Starts flow runs in child processes (forked from one pre-imported process, see child_flow.py)."""
    from relutil import Launcher

    launcher = Launcher(prefect_server, tmp_path_factory.mktemp("launcher"))
    yield launcher
    launcher.close()
