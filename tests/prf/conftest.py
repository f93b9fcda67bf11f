"""Fixtures of the PRF tests: the main simulated field, built once per session."""

from __future__ import annotations

import pytest
from prfutil import MAIN, MAIN_PARAMS, setup_field


@pytest.fixture(scope="session")
def main(tmp_path_factory):
    return setup_field(tmp_path_factory.mktemp("main"), MAIN, MAIN_PARAMS)
