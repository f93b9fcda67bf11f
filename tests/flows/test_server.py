"""``photref server``: a server on a non-default port serves a UI pointed at its own API; the temporary
server's slow start is retried, then refused in one line (issue 26, items 5 and 6)."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest
from cliproc import photref

from flows import server
from flows._ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_server_on_another_port_serves_a_ui_that_calls_its_own_api(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = photref(["server", "start", "--port", str(port)], env)
    try:
        assert started.returncode == 0, started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout
        # What the UI's page asks first: where its API is.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
            settings = json.load(response)
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
        status = photref(["server", "status"], env, timeout=60)
        assert status.returncode == 0 and f":{port}" in status.stdout
    finally:
        stopped = photref(["server", "stop"], env, timeout=60)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout


class _FakeServer:
    """Prefect's SubprocessASGIServer, failing its first ``failures`` starts like a loaded machine."""

    def __init__(self, failures: int):
        self.failures, self.timeouts, self.stops, self.launches = failures, [], 0, 0
        self.api_url = "http://127.0.0.1:9/api"

    def launch(self):
        self.launches += 1

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
    monkeypatch.setattr(server, "TemporaryServer", lambda: fake)  # what the command launches first thing
    monkeypatch.setattr(server, "_this_command", None)
    monkeypatch.setattr(runners, "_temporary_server_needed", lambda: False)
    monkeypatch.setattr(server.atexit, "register", lambda stop: None)
    code = cli.main(["master", "s.zarr", "--catalog", "c.fits", "--output", "m.fits"])
    assert fake.launches == 1 and len(fake.timeouts) == 2
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("photref: error: Prefect's temporary server did not start")
    assert "photref server start" in last


def test_temporary_server_process_that_never_answers_times_out_and_is_stopped():
    """The command's own temporary server: a stand-in process that never answers fails the wait with
    Prefect's "Timed out" (what start_temporary_server retries on), and stop() ends the process."""
    stand_in = server.TemporaryServer(command=[sys.executable, "-c", "import time; time.sleep(60)"])
    stand_in.launch()
    process = stand_in._process
    with pytest.raises(RuntimeError, match="Timed out"):
        stand_in.start(timeout=0.5)
    stand_in.stop()
    assert process.poll() is not None
    exited = server.TemporaryServer(command=[sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with 3"):
        exited.start(timeout=30)


def _temporary_servers() -> set[int]:
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "prefect.server.api.server:create_app" in " ".join(proc.info["cmdline"] or []):
            found.add(proc.info["pid"])
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_command_without_a_server_starts_its_temporary_server_first_and_stops_it(small_field, tmp_path):
    """No server: the command launches the temporary server's process before its imports, runs the flow
    on it, says the run is gone with the command, and leaves no server process behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    before = _temporary_servers()
    args = ["ingest", str(tmp_path / "s.zarr"), *map(str, small_field.frames[:5])]
    done = photref([*args, "--catalog", str(small_field.catalog)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using a temporary one" in done.stderr
    assert "on a temporary Prefect server, gone with this command" in done.stdout
    assert "ingested 5 frame(s) now" in done.stdout
    assert not (_temporary_servers() - before)
