"""Test fixtures: one real Prefect server for the whole session, simulated fields on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Before prefect is imported anywhere: a project-local home and no analytics (there is no internet).
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def prefect_server():
    """A real (temporary, SQLite) Prefect server shared by every test that runs a flow."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def small_field(tmp_path_factory):
    """A simulated field: 40 frames x 300 stars x 3 photometries (read-only: copy before changing)."""
    from photref_core.simulate.photometry import simulate_photometry

    return simulate_photometry(tmp_path_factory.mktemp("field"), frames=40, stars=300, photometries=3, seed=7)
