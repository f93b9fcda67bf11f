"""``photref server start --postgres``: a Prefect server on a local PostgreSQL cluster (issue 31).

The cluster is real (the machine's PostgreSQL binaries: initdb, pg_ctl, createdb), the server is a real
``prefect server start`` process, and the flows run as a user runs them: ``photref master`` as a process,
then 20 cached runs back to back from one Python process (where Prefect's SQLite server answers "database
is locked" and the client backs off 2 s; ``bench/orchestration.py`` shows both)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from cliproc import photref

from flows import postgres, server
from flows._ports import free_port

ROOT = Path(__file__).resolve().parents[2]

try:
    BINDIR = postgres.postgres_bindir()
    NO_POSTGRES = ""
except postgres.PostgresError as exc:  # the reason is the error's own message
    BINDIR, NO_POSTGRES = None, str(exc)

needs_postgres = pytest.mark.skipif(BINDIR is None, reason=f"no PostgreSQL here: {NO_POSTGRES}")


@pytest.fixture
def open_home():
    """A Prefect home other users can reach: run as root, the cluster runs as an unprivileged user, and
    pytest's own temporary directories are closed to other users (mode 700)."""
    parent = Path(tempfile.mkdtemp(prefix="photref-pg-"))
    parent.chmod(0o755)
    yield parent / "home"
    photref(["server", "stop"], os.environ | {"PREFECT_HOME": str(parent / "home")}, timeout=120)
    shutil.rmtree(parent, ignore_errors=True)


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(
        api_url + "/flow_runs/filter",
        data=json.dumps({"limit": 200}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


BACK_TO_BACK = """
import json, sys, time
from bench.orchestration import BackoffCounter
from flows.master_photref import run_master

store, catalog, output, frames = sys.argv[1:5]
times, states = [], []
with BackoffCounter() as counter:
    for _ in range(20):
        start = time.perf_counter()
        state = run_master(store, catalog, output, frames=[frames], max_workers=2, return_state=True)
        times.append(time.perf_counter() - start)
        states.append(state.type.value)
print(json.dumps({"times": times, "states": states, "backoffs": counter.backoffs}))
"""


@needs_postgres
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_postgres_backed_server_runs_back_to_back_without_backoff_and_keeps_its_runs(
    small_field, tmp_path, open_home
):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(open_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    started = photref(["server", "start", "--postgres", "--port", str(port)], env)
    assert started.returncode == 0, started.stderr
    assert (
        "database: PostgreSQL 127.0.0.1:" in started.stdout and str(open_home / "postgres") in started.stdout
    )
    assert (open_home / "postgres" / "data" / "PG_VERSION").exists()
    api = f"http://127.0.0.1:{port}/api"
    status = photref(["server", "status"], env, timeout=60)
    assert status.returncode == 0 and "database: PostgreSQL" in status.stdout

    # The master flow twice, as processes on this server: the second is served from the cache.
    field = tmp_path / "field"
    shutil.copytree(Path(small_field.catalog).parent, field)
    store, catalog, output = tmp_path / "s.zarr", field / "catalog.fits", tmp_path / "m.fits"
    frames = str(field / "frames" / "*.fits")
    master = ["master", str(store), "--catalog", str(catalog), "--output", str(output), "--frames", frames]
    first = photref(master, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"photref: Prefect server http://127.0.0.1:{port}" in first.stderr
    assert first.stdout.startswith(f"master: {output} (written now)")
    second = photref(master, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.startswith(f"master: {output} (unchanged: from the cache)")

    # 20 flow runs back to back, no pause: no answer retried (SQLite's "database is locked" is a 503 the
    # client retries after 2 s), every run completed.
    child = subprocess.run(
        [sys.executable, "-c", BACK_TO_BACK, str(store), str(catalog), str(output), frames],
        env=env | {"PREFECT_API_URL": api},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    runs = json.loads(child.stdout.strip().splitlines()[-1])
    assert runs["states"] == ["COMPLETED"] * 20
    assert runs["backoffs"] == []
    assert "database is locked" not in child.stderr

    listed = {run["id"]: run for run in _flow_runs(api)}
    masters = [run for run in listed.values() if run["name"].startswith("master ")]
    assert len(masters) >= 22, sorted(run["name"] for run in listed.values())

    # Stop (the server and the cluster), start again without naming the database: the same runs are there.
    stopped = photref(["server", "stop"], env, timeout=120)
    assert (
        stopped.returncode == 0 and stopped.stdout.strip() == "Prefect server and PostgreSQL cluster stopped"
    )
    assert not (open_home / "postgres" / "data" / "postmaster.pid").exists()
    assert photref(["server", "status"], env, timeout=60).returncode == 3
    again = photref(["server", "start", "--port", str(port)], env)
    assert again.returncode == 0, again.stderr
    assert "database: PostgreSQL" in again.stdout
    assert set(listed) <= {run["id"] for run in _flow_runs(api)}
    # Another database while it runs is refused, naming the one it runs on.
    refused = photref(["server", "start", "--sqlite"], env, timeout=60)
    assert refused.returncode == 1 and "runs on PostgreSQL" in refused.stderr
    assert (open_home / "server.log").stat().st_size > 0  # the server's output is kept


def test_the_database_choice_is_checked_and_kept_per_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert server.database_choice() == {"backend": "sqlite"}
    url = "postgresql://u:secret@db.example:5432/prefect"
    choice = server.database_choice("url", url)
    assert choice == {"backend": "url", "url": "postgresql+asyncpg://u:secret@db.example:5432/prefect"}
    assert "secret" not in server.describe_database(choice)
    assert server.describe_database(choice) == "PostgreSQL postgresql+asyncpg://u:***@db.example:5432/prefect"
    with pytest.raises(RuntimeError, match="must be a PostgreSQL URL"):
        server.database_choice("url", "sqlite:///x.db")
    server._remember_database(choice)
    assert server.database_choice() == choice
    assert (tmp_path / "photref-database.json").stat().st_mode & 0o077 == 0  # it holds a password
    assert postgres.redact("postgresql+asyncpg://prefect@h:1/db") == "postgresql+asyncpg://prefect@h:1/db"


def test_server_start_options_name_one_database(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["server", "start", "--postgres", "--sqlite"])
    assert exit_code.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_postgres_without_its_programs_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PHOTREF_POSTGRES_BIN", str(tmp_path / "nowhere"))
    assert main(["server", "start", "--postgres"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "photref: error: PostgreSQL's server programs (initdb, pg_ctl, createdb) are not in "
    )
    assert "--database-url" in err and "Traceback" not in err
    assert not (tmp_path / "home" / "photref-database.json").exists()  # nothing remembered


@needs_postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as another user")
def test_as_root_a_home_the_cluster_user_cannot_reach_is_named(tmp_path):
    closed = tmp_path / "closed"
    (closed / "home").mkdir(parents=True)
    closed.chmod(0o700)
    cluster = postgres.LocalCluster(closed / "home")
    with pytest.raises(postgres.PostgresError, match=f"cannot reach {cluster.directory}: ") as error:
        cluster.start()
    named = Path(re.search(r"reach [^:]+: (.+) is closed to other users", str(error.value)).group(1))
    assert named in cluster.directory.parents and not named.stat().st_mode & 0o001
    assert not cluster.data.exists()


@needs_postgres
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_database_url_uses_an_existing_postgres_and_a_refused_one_is_one_line(open_home):
    """--database-url: a PostgreSQL photref did not make (here another home's cluster) is used as it is,
    named without its password, and left running at stop; one that refuses the connection fails the start
    with the reason from the server's log."""
    existing = postgres.LocalCluster(open_home.parent / "elsewhere")
    database = existing.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        env |= {"PREFECT_HOME": str(open_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        port = free_port()
        started = photref(["server", "start", "--port", str(port), "--database-url", database], env)
        assert started.returncode == 0, started.stderr
        password = database.split(":")[2].split("@")[0]
        assert "database: PostgreSQL postgresql+asyncpg://prefect:***@127.0.0.1:" in started.stdout
        assert password not in started.stdout + started.stderr
        assert _flow_runs(f"http://127.0.0.1:{port}/api") == []
        assert not (open_home / "postgres").exists()  # no cluster of its own
        stopped = photref(["server", "stop"], env, timeout=120)
        assert stopped.stdout.strip() == "Prefect server stopped"
        assert existing.running_port() is not None  # not photref's to stop

        refused = "postgresql+asyncpg://prefect:x@127.0.0.1:9/prefect"  # port 9: nothing listens
        failed = photref(["server", "start", "--port", str(port), "--database-url", refused], env)
        assert failed.returncode == 1
        assert "the Prefect server ended with " in failed.stderr
        assert "Connect call failed ('127.0.0.1', 9)" in failed.stderr and "server.log" in failed.stderr
        assert photref(["server", "status"], env, timeout=60).returncode == 3
    finally:
        existing.stop()
