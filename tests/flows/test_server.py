"""``photref server``: a server on a non-default port serves a UI pointed at its own API; the temporary
server's slow start is retried, then refused in one line (issue 26, items 5 and 6)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows import server

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _photref(args, env, timeout=150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_server_on_another_port_serves_a_ui_that_calls_its_own_api(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = _photref(["server", "start", "--port", str(port)], env)
    try:
        assert started.returncode == 0, started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout
        # What the UI's page asks first: where its API is.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
            settings = json.load(response)
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
        status = _photref(["server", "status"], env, timeout=60)
        assert status.returncode == 0 and f":{port}" in status.stdout
    finally:
        stopped = _photref(["server", "stop"], env, timeout=60)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout


class _FakeServer:
    """Prefect's SubprocessASGIServer, failing its first ``failures`` starts like a loaded machine."""

    def __init__(self, failures: int):
        self.failures, self.timeouts, self.stops = failures, [], 0

    def start(self, timeout=None):
        self.timeouts.append(timeout)
        if len(self.timeouts) <= self.failures:
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    def stop(self):
        self.stops += 1


def test_the_temporary_server_start_is_retried_with_a_longer_timeout():
    fake = _FakeServer(failures=1)
    server.start_temporary_server(fake)
    assert len(fake.timeouts) == 2 and fake.timeouts[1] > fake.timeouts[0] >= 20
    assert fake.stops == 1  # the half-started process is stopped before the retry


def test_a_temporary_server_that_never_starts_is_one_line_and_exit_2(monkeypatch, capsys):
    from flows import cli, runners

    fake = _FakeServer(failures=2)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server, "running_server", lambda: None)
    monkeypatch.setattr(server, "_profile_sets_api_url", lambda: False)
    monkeypatch.setattr(server, "_temporary_server", lambda: fake)
    monkeypatch.setattr(runners, "_temporary_server_needed", lambda: True)
    code = cli.main(["master", "s.zarr", "--catalog", "c.fits", "--output", "m.fits"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("photref: error: Prefect's temporary server did not start")
    assert "photref server start" in last
