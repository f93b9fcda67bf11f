"""Deployments end to end against a real Prefect server that this module starts on 127.0.0.1, on
PostgreSQL (the production set-up of deployments/README.md; SQLite where the machine has no PostgreSQL).

* serve path: ``deployments/serve.py`` as a subprocess; a triggered nightly run completes, its artifacts
  are readable through the API and the cron schedule is registered;
* worker path: ``prefect work-pool create``, ``prefect deploy`` with ``deployments/prefect.yaml`` and a
  ``prefect worker start --run-once`` subprocess;
* bad parameters are refused (by the server when the run is created, or by the flow engine when the run
  starts), with a message naming the field.

The session's ``prefect_server`` fixture (tests/conftest.py) is not used: every subprocess gets this
module's server in ``PREFECT_API_URL``, a ``PREFECT_HOME`` under tmp and no analytics; the code run here
talks to the same server through ``temporary_settings``. Every wait is bounded and every subprocess is
killed (its whole process group) in a ``finally`` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.artifacts import (
    INGESTION_PROGRESS,
    INGESTION_SUMMARY,
    MASTER_SUMMARY,
    MASTER_TABLE,
    NIGHTLY_SUMMARY,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect") if (BIN / "prefect").exists() else "prefect"
SERVED_NIGHTLY = "nightly-master/nightly-served"
SERVED_MANUAL = "master-photref/manual-served"
SERVED_CRON = "30 5 * * 1-5"  # not the default, to check that --cron reaches the server
POOL = "photref-pool"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


# --------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _kill(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a subprocess started with ``start_new_session``: SIGTERM to its group, then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def _spawn(cmd: list[str], env: dict, log: Path, cwd: Path = ROOT):
    """Run ``cmd`` in its own process group, output to ``log``; always killed on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            _kill(proc)


def _run(cmd: list[str], env: dict, log: Path, cwd: Path = ROOT, timeout: float = 120.0) -> None:
    """Run ``cmd`` to completion (bounded); fail the test with its output when it fails."""
    with _spawn(cmd, env, log, cwd) as proc:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd)} did not finish in {timeout:.0f} s:\n{_tail(log)}")
    assert rc == 0, f"{' '.join(cmd)} exited with {rc}:\n{_tail(log)}"


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s or if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process died (rc {proc.returncode}) while waiting for {what}:\n{_tail(log)}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" + (f":\n{_tail(log)}" if log else ""))


@contextlib.contextmanager
def _api(url: str):
    """Point the Prefect client of this process at ``url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _call(url: str, fn, *args, **kwargs):
    """Run ``await fn(client, *args, **kwargs)`` with a client of the server at ``url``."""
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await fn(client, *args, **kwargs)

    with _api(url):
        return asyncio.run(go())


async def _deployment_or_none(client, name):
    from prefect.exceptions import ObjectNotFound

    try:
        return await client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


async def _run_tree_artifacts(client, flow_run_id):
    """(flow runs of the tree rooted at ``flow_run_id``, their artifacts), through the API's filters."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        )
        frontier = [run.id for run in children if run.id not in ids]
        ids += frontier
    runs = [await client.read_flow_run(i) for i in ids]
    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
    )
    return runs, artifacts


def _run_deployment(url: str, name: str, **kwargs):
    from prefect.deployments import run_deployment

    with _api(url):
        return run_deployment(name, poll_interval=1, **kwargs)


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deployments")


@pytest.fixture(scope="module")
def field(workdir):
    """A tiny simulated field: 12 frames x 80 stars x 2 photometries."""
    from photref_core.simulate.photometry import simulate_photometry

    return simulate_photometry(workdir / "field", frames=12, stars=80, photometries=2, seed=11)


@pytest.fixture(scope="module")
def database(workdir):
    """The server's database: PostgreSQL, the production set-up of deployments/README.md (a cluster of
    :mod:`flows.postgres` in a directory other users can reach: run as root, the cluster runs as another
    user), else SQLite where this machine has no PostgreSQL."""
    from flows.postgres import LocalCluster, PostgresError, postgres_bindir

    try:
        postgres_bindir()
    except PostgresError:
        yield f"sqlite+aiosqlite:///{workdir / 'server.db'}"
        return
    parent = Path(tempfile.mkdtemp(prefix="photref-deploy-pg-"))
    parent.chmod(0o755)
    cluster = LocalCluster(parent)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def server(workdir, database):
    """A real Prefect server on a free port of 127.0.0.1: (api url, env for subprocesses)."""
    home = workdir / "prefect-home"
    home.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PHOTREF_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # Quick pick-up of triggered runs by the serve runner and the worker.
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    server_env = dict(env)
    server_env.pop("PREFECT_API_URL")
    server_env.update(
        PREFECT_API_DATABASE_CONNECTION_URL=database,
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_SERVER_LEVEL="WARNING",
    )
    log = workdir / "server.log"
    cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _spawn(cmd, server_env, log, cwd=workdir) as proc:

        def healthy():
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    return response.status == 200
            except (OSError, urllib.error.URLError):
                return False

        _wait_for(healthy, 120, "the Prefect server's /api/health", proc, log)
        yield url, env


@pytest.fixture(scope="module")
def served(server, field, workdir):
    """``deployments/serve.py`` serving the nightly deployment of the field (a subprocess)."""
    url, env = server
    out = workdir / "serve-out"
    args = {
        "store": workdir / "serve.zarr",
        "catalog": field.catalog,
        "frames": Path(field.catalog).parent / "frames" / "*.fits",
        "output": out / "master.fits",
    }
    cmd = [sys.executable, str(ROOT / "deployments" / "serve.py"), "--cron", SERVED_CRON]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    log = workdir / "serve.log"
    with _spawn(cmd, env, log) as proc:
        # serve() registers its deployments one after another: wait for each the tests use, not the first.
        for name in (SERVED_NIGHTLY, SERVED_MANUAL):
            _wait_for(
                lambda name=name: _call(url, _deployment_or_none, name), 90, f"deployment {name}", proc, log
            )
        yield {"url": url, "proc": proc, "log": log, **{k: str(v) for k, v in args.items()}}


def _settings(served, **changes) -> dict:
    base = {k: served[k] for k in ("store", "catalog", "output")} | {"frames_glob": served["frames"]}
    return base | changes


# ------------------------------------------------------------------------------------------------ tests


def test_settings_are_validated_without_a_server():
    from pydantic import ValidationError

    from flows.nightly import NightlySettings

    paths = {"store": "s.zarr", "catalog": "c.fits", "frames_glob": "f/*.fits", "output": "m.fits"}
    settings = NightlySettings(**paths)
    assert settings.master_parameters()["frames"] == ["f/*.fits"]
    assert "frames_glob" not in settings.master_parameters()
    for bad, field_name in [
        ({"fit_terms": "O2{phot_g_mean_mag"}, "fit_terms"),
        ({"fit_terms": "{().__class__}"}, "fit_terms"),
        ({"rejection_units": "sigma"}, "rejection_units"),
        ({"outlier_threshold": 0}, "outlier_threshold"),
        ({"fit_outlier_threshold": float("nan")}, "fit_outlier_threshold"),
        ({"max_rejection_iterations": -1}, "max_rejection_iterations"),
        ({"store": ""}, "store"),
        ({"colour": "red"}, "colour"),
    ]:
        with pytest.raises(ValidationError) as info:
            NightlySettings(**(paths | bad))
        assert field_name in str(info.value)


def test_prefect_yaml_parameters_are_the_flows_parameters():
    """Every deployment of prefect.yaml names a flow parameter or settings field that exists and passes the
    flow's own validation; the values it leaves out are the parameter objects' defaults."""
    import importlib

    import yaml

    from flows.nightly import NightlySettings
    from photref_core.master.parameters import MASTER_DEFAULTS

    def fill(value):  # what `prefect deploy` does with the {{ $VAR }} placeholders
        if isinstance(value, str) and value.startswith("{{"):
            return "/data/" + value.strip("{} $").lower()
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"nightly", "manual"}
    for deployment in spec["deployments"]:
        entry = deployment["entrypoint"]
        module, name = entry.split(":") if ":" in entry else entry.rsplit(".", 1)
        module = module.removesuffix(".py").replace("/", ".")
        flow = getattr(importlib.import_module(module), name)
        parameters = fill(deployment["parameters"])
        assert set(parameters) <= set(flow.parameters.properties), (entry, sorted(parameters))
        validated = flow.validate_parameters(parameters)  # raises on a bad name, type or value
        if "settings" in validated:
            settings = validated["settings"]
            assert isinstance(settings, NightlySettings)
            assert {k: getattr(settings, k) for k in MASTER_DEFAULTS} == MASTER_DEFAULTS
    from prefect.exceptions import ParameterTypeError

    from flows.nightly import nightly_master

    bad = fill(spec["deployments"][0]["parameters"])
    bad["settings"]["outlier_threshold"] = -1
    with pytest.raises(ParameterTypeError, match="outlier_threshold"):
        nightly_master.validate_parameters(bad)


def _by_kind(artifacts) -> dict:
    """Artifacts by kind: their keys are ``<kind>-<field slug>`` (flows.artifacts)."""
    kinds = (NIGHTLY_SUMMARY, MASTER_SUMMARY, MASTER_TABLE, INGESTION_SUMMARY, INGESTION_PROGRESS)
    return {kind: a for a in artifacts for kind in kinds if a.key and a.key.startswith(kind + "-")}


def _import_serve():
    sys.path.insert(0, str(ROOT / "deployments"))
    try:
        import serve
    finally:
        sys.path.remove(str(ROOT / "deployments"))
    return serve


def test_serve_command_line_defaults(monkeypatch):
    serve = _import_serve()
    for name in [k for k in os.environ if k.startswith("PHOTREF_")]:
        monkeypatch.delenv(name)
    args = serve.build_parser().parse_args(["--store", "s", "--set", "outlier_threshold=4"])
    assert (args.cron, args.timezone, args.store) == ("0 6 * * *", "UTC", "s")
    assert args.settings == [("outlier_threshold", 4)]
    monkeypatch.setenv("PHOTREF_NIGHTLY_CRON", "0 7 * * *")
    monkeypatch.setenv("PHOTREF_STORE", "/data/s.zarr")
    args = serve.build_parser().parse_args([])
    assert (args.cron, args.store) == ("0 7 * * *", "/data/s.zarr")
    with pytest.raises(SystemExit):  # no paths: refused before anything is registered
        serve.main(["--catalog", "c.fits"])


def test_serve_adds_the_prf_flows_when_they_exist(monkeypatch):
    import types

    from prefect import flow

    serve = _import_serve()
    args = serve.build_parser().parse_args(
        ["--store", "s.zarr", "--catalog", "c.fits", "--frames", "f/*.fits", "--output", "m.fits"]
    )
    module = types.ModuleType("flows.prf")

    def solve_prf(store: str, images: list[str]) -> dict:
        return {}

    solve_prf.__module__ = module.__name__
    module.solve_prf = flow(name="prf-test")(solve_prf)
    monkeypatch.setitem(sys.modules, "flows.prf", module)
    names = [(d.flow_name, d.name, d.entrypoint) for d in serve.build_deployments(args)]
    assert names == [
        ("nightly-master", "nightly-served", "flows.nightly.nightly_master"),
        ("master-photref", "manual-served", "flows.master_photref.build_master_photref"),
        ("prf-test", "manual-served", "flows.prf.solve_prf"),
    ]


def test_serve_path_runs_the_nightly_master(served):
    url = served["url"]
    deployment = _call(url, _deployment_or_none, SERVED_NIGHTLY)
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (SERVED_CRON, "UTC", True)
    assert deployment.parameters["settings"]["frames_glob"] == served["frames"]
    assert deployment.enforce_parameter_schema
    assert _call(url, _deployment_or_none, SERVED_MANUAL) is not None

    flow_run = _run_deployment(url, SERVED_NIGHTLY, timeout=180)
    assert flow_run.state.is_completed(), f"{flow_run.state!r}\n{_tail(served['log'])}"
    assert flow_run.name.startswith("nightly ") and flow_run.name.endswith(Path(served["store"]).name)

    runs, artifacts = _call(url, _run_tree_artifacts, flow_run.id)
    names = {r.name for r in runs}
    assert any(n.startswith("master ") for n in names) and any(n.startswith("ingest ") for n in names)
    assert all(r.state.is_completed() for r in runs)
    by_kind = _by_kind(artifacts)
    expected = {NIGHTLY_SUMMARY, MASTER_SUMMARY, MASTER_TABLE, INGESTION_SUMMARY, INGESTION_PROGRESS}
    assert expected <= set(by_kind), sorted(a.key for a in artifacts)
    assert by_kind[MASTER_SUMMARY].type == "markdown"
    assert served["output"] in by_kind[MASTER_SUMMARY].data
    assert by_kind[MASTER_TABLE].type == "table"
    assert "in master" in by_kind[MASTER_TABLE].data
    assert "| ingested now | 12 |" in by_kind[INGESTION_SUMMARY].data
    assert float(by_kind[INGESTION_PROGRESS].data) == 100.0
    assert Path(served["output"]).exists()


def test_bad_parameters_are_refused(served):
    from prefect.exceptions import PrefectHTTPStatusError

    url = served["url"]
    # What the parameter schema can express is refused by the server: no run is created.
    for bad, field_name in [
        ({"rejection_center": "mode"}, "settings.rejection_center"),
        ({"outlier_threshold": -1}, "settings.outlier_threshold"),
    ]:
        with pytest.raises(PrefectHTTPStatusError) as info:
            _run_deployment(url, SERVED_NIGHTLY, parameters={"settings": _settings(served, **bad)}, timeout=0)
        assert info.value.response.status_code == 409
        assert field_name in str(info.value)

    # The fit-terms grammar is checked by the flow engine, before any work: the run fails at once.
    flow_run = _run_deployment(
        url,
        SERVED_NIGHTLY,
        parameters={"settings": _settings(served, fit_terms="O2{__import__}", output=served["output"] + "x")},
        timeout=120,
    )
    assert flow_run.state.is_failed(), f"{flow_run.state!r}\n{_tail(served['log'])}"
    assert "settings.fit_terms" in flow_run.state.message and "__import__" in flow_run.state.message
    assert not Path(served["output"] + "x").exists()

    # A direct call is refused the same way.
    from prefect.exceptions import ParameterTypeError

    from flows.nightly import nightly_master

    with _api(url), pytest.raises(ParameterTypeError, match=r"settings\.scatter_quantity"):
        nightly_master(settings=_settings(served, scatter_quantity="stddev"))


def test_worker_path_with_prefect_yaml(server, field, workdir):
    url, base_env = server
    yaml_file = ROOT / "deployments" / "prefect.yaml"
    before = hashlib.sha256(yaml_file.read_bytes()).hexdigest()
    out = workdir / "worker-out"
    env = base_env | {
        "PHOTREF_STORE": str(workdir / "worker.zarr"),
        "PHOTREF_CATALOG": str(field.catalog),
        "PHOTREF_FRAMES": str(Path(field.catalog).parent / "frames" / "*.fits"),
        "PHOTREF_OUTPUT": str(out / "master.fits"),
    }
    _run([PREFECT, "work-pool", "create", POOL, "--type", "process"], env, workdir / "pool.log")
    _run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(yaml_file.relative_to(ROOT))],
        env,
        workdir / "deploy.log",
        cwd=ROOT,
    )
    assert hashlib.sha256(yaml_file.read_bytes()).hexdigest() == before, "prefect deploy rewrote prefect.yaml"

    deployment = _call(url, _deployment_or_none, "nightly-master/nightly")
    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/nightly.py:nightly_master"
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 6 * * *", "UTC")
    assert deployment.parameters["settings"]["store"] == env["PHOTREF_STORE"]
    assert deployment.parameters["settings"]["frames_glob"] == env["PHOTREF_FRAMES"]
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT.resolve())}}
    ]
    assert _call(url, _deployment_or_none, "master-photref/manual") is not None

    flow_run = _run_deployment(url, "nightly-master/nightly", timeout=0)
    log = workdir / "worker.log"
    # The worker starts elsewhere: the deployment's pull step brings it to the repository root.
    cmd = [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--run-once"]
    with _spawn(cmd, env, log, cwd=workdir) as worker:
        exited_at = []

        def finished():
            run = _call(url, lambda client: client.read_flow_run(flow_run.id))
            if run.state.is_final():
                return run
            if worker.poll() is not None:  # --run-once exits when done: give the API a moment, no more
                exited_at.append(time.monotonic())
                if exited_at[-1] - exited_at[0] > 15:
                    pytest.fail(f"worker exited (rc {worker.returncode}), run {run.state!r}:\n{_tail(log)}")
            return None

        final = _wait_for(finished, 180, "the worker's flow run", log=log)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(timeout=30)  # --run-once: it exits by itself once the run is done
    assert final.state.is_completed(), f"{final.state!r}\n{_tail(log)}"
    _, artifacts = _call(url, _run_tree_artifacts, flow_run.id)
    assert {NIGHTLY_SUMMARY, MASTER_SUMMARY, INGESTION_SUMMARY} <= set(_by_kind(artifacts))
    assert (out / "master.fits").exists() and (out / "master_stat.fits").exists()
