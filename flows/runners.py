"""How a photref flow run is run: its task runner, and the Prefect settings of a run started by hand.

``ThreadPoolTaskRunner`` is unbounded by default; photref always bounds it (``max_workers``). With a
``dask_address`` ("tcp://host:8786") the tasks run on that ``distributed`` scheduler instead.

Flow-run heartbeat
------------------
Prefect 3.8.8 sends a heartbeat from a thread that sleeps in 1 s steps, and joins that thread at the end of
every flow run (subflows included): each flow run then ends up to 1-2 s late, however little it did. The
heartbeat serves one purpose, detecting crashed runs of deployments (an automation marks a run whose
heartbeats stop as crashed). So photref's entry points for runs started by hand (``run_ingest``,
``run_master``, ``run_prf``, the ``photref`` command, the demo) run without it, and a cached re-run returns
at once; deployment runs (``deployments/``) keep Prefect's heartbeat. A heartbeat configured explicitly
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in the environment or the Prefect profile) is always kept.

Dask workers and the Prefect server
-----------------------------------
Tasks on a Dask scheduler run in the worker processes, and report their states to the Prefect API named
in the settings the flow run hands them. On Prefect's temporary server that is no URL at all, and each
worker then starts a temporary server of its own (a 0.5 s master took 56 s). So a run by hand with
``dask_address`` and no ``PREFECT_API_URL`` starts the temporary server itself and names its URL in the
run's settings: local workers report to the run's server. Workers on other machines cannot reach it
(it listens on 127.0.0.1): such a run is refused, with what to start instead.

What Prefect rebuilds for every flow run
----------------------------------------
A cached re-run does almost nothing, so Prefect's own per-run costs are most of it. Runs started by hand
reuse, within a process, what Prefect would rebuild each time: the settings copy, an API client with its
TLS context (:func:`api_client`), the default local result storage (:func:`_result_storage`) and the
flow configured with its task runner.
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
from pathlib import Path
from urllib.parse import urlparse

import certifi
from prefect.context import SettingsContext, SyncClientContext, get_settings_context
from prefect.filesystems import LocalFileSystem
from prefect.results import get_default_result_storage
from prefect.settings import get_current_settings
from prefect.task_runners import ThreadPoolTaskRunner

from flows.server import start_temporary_server, temporary_server_of_this_command
from photref_core.blas import threads_per_task

DEFAULT_MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))


def blas_threads_per_task(n_tasks: int) -> int:
    """BLAS threads for each of ``n_tasks`` numeric tasks of the current flow run, run at once by its task
    runner: the cores shared out among as many as its threads run together (one on Dask workers, whose
    threads already fill their cores)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = None if context is None else context.task_runner
    workers = getattr(runner, "_max_workers", None) if isinstance(runner, ThreadPoolTaskRunner) else None
    if runner is not None and workers is None:
        return 1
    return threads_per_task(min(max(1, n_tasks), workers or DEFAULT_MAX_WORKERS))


def make_task_runner(max_workers: int | None = None, dask_address: str | None = None):
    """Build the task runner a flow run uses.

    Parameters
    ----------
    max_workers : int, optional
        Threads of the local pool (default: the number of cores, at most 4).
    dask_address : str, optional
        Address of an existing Dask ``distributed`` scheduler; when given, tasks run there.
    """
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    return ThreadPoolTaskRunner(max_workers=max_workers or DEFAULT_MAX_WORKERS)


def heartbeat_configured() -> bool:
    """Whether the flow-run heartbeat frequency was set explicitly (environment or Prefect profile)."""
    return "heartbeat_frequency" in get_current_settings().flows.model_fields_set


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def _temporary_server_url(dask_address: str) -> str:
    """Start Prefect's temporary server (the one this process would start at its first API call) and
    return its API URL, for Dask workers on this machine; refuse workers elsewhere."""
    import socket

    from prefect.server.api.server import SubprocessASGIServer

    from photref_core.errors import PhotrefError

    host = urlparse(dask_address if "://" in dask_address else f"tcp://{dask_address}").hostname or ""
    if host not in _LOCAL_HOSTS | {socket.gethostname(), socket.getfqdn()}:
        raise PhotrefError(
            f"--dask-address {dask_address}: Dask workers on another machine cannot report to Prefect's "
            "temporary server (it listens on 127.0.0.1 of this process). Start a server they can reach "
            "(`photref server start --host 0.0.0.0`, or `prefect server start`) and set "
            "PREFECT_API_URL=http://<this host>:<port>/api here"
        )
    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def _temporary_server_needed() -> bool:
    """Whether this process's runs go to Prefect's temporary server (no API URL, temporary mode on)."""
    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


@contextlib.contextmanager
def hand_run_settings(dask_address: str | None = None):
    """Prefect settings for flow runs started by hand: no flow-run heartbeat, unless one is configured.

    The environment variable cannot say "no heartbeat" (Prefect reads it as an integer >= 30), so this is
    a settings context around the flow call. It copies the current settings with the one field changed
    (``model_copy``, microseconds) rather than using ``prefect.settings.temporary_settings``, which
    re-reads every setting from the environment and the profile (25-30 ms here, a third of an empty flow
    run).
    """
    context = get_settings_context()
    settings = context.settings
    updates = {}
    if not heartbeat_configured():
        updates["flows"] = settings.flows.model_copy(update={"heartbeat_frequency": None})
    if dask_address and not settings.api.url:
        updates["api"] = settings.api.model_copy(update={"url": _temporary_server_url(dask_address)})
    if not updates:
        yield
        return
    with SettingsContext(profile=context.profile, settings=settings.model_copy(update=updates)):
        yield


@functools.lru_cache(maxsize=8)
def _tls_context(skip_verify: bool, cert_file: str | None) -> ssl.SSLContext:
    """The TLS context Prefect's client builds for itself (same settings, same rules), built once."""
    if skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cert_file or certifi.where())


#: The private attribute of Prefect's SyncClientContext that :func:`api_client` sets.
PRIVATE_HTTPX_SETTINGS = "_httpx_settings"


@contextlib.contextmanager
def api_client():
    """A Prefect API client for one flow run started by hand, with a TLS context made once per process.

    Prefect's flow engine opens a new client for every flow run, and each new client loads the whole CA
    bundle (15-20 ms here, even for an ``http://`` API). The engine and every ``get_client()`` inside the
    run use the client of an enclosing client context, so one is opened here with a shared TLS context.
    """
    if SyncClientContext.get() is not None:
        yield
        return
    api = get_current_settings().api
    context = SyncClientContext(
        httpx_settings={"verify": _tls_context(api.tls_insecure_skip_verify, api.ssl_cert_file)}
    )
    # get_client() hands out a context's client only when asked with the same httpx settings; Prefect's
    # own code asks with none, so the context is made to say none (its client is what Prefect would build).
    # A private attribute of Prefect 3.8: should an upgrade drop it, runs go on with Prefect's own clients
    # (correct, ~20 ms slower a run) and tests/flows/test_master_flow.py
    # ::test_the_private_prefect_attribute_the_hand_runs_rely_on_exists fails, saying so.
    if not hasattr(context, PRIVATE_HTTPX_SETTINGS):
        yield
        return
    setattr(context, PRIVATE_HTTPX_SETTINGS, None)
    with context:
        yield


@functools.lru_cache(maxsize=8)
def _local_result_storage(api_url: str | None, default_block: str | None, local_path: str) -> Path | None:
    """Prefect's default result storage when it is a local directory (asked of the server once)."""
    storage = get_default_result_storage()
    if isinstance(storage, LocalFileSystem) and getattr(storage, "_block_document_id", None) is None:
        return Path(storage.basepath)
    return None  # a storage block (the server's default or a setting): left to Prefect


def _result_storage() -> Path | None:
    """Where a hand run's results go: Prefect's default, resolved once per API and settings.

    Prefect asks the server for its default result-storage block twice at the start of every flow run
    whose flow names no storage (about 10 ms of a cached re-run here); naming the same local directory on
    the flow skips that, and its tasks inherit it, as they inherit the default.
    """
    settings = get_current_settings()
    return _local_result_storage(
        settings.api.url, settings.results.default_storage_block, str(settings.results.local_storage_path)
    )


@functools.lru_cache(maxsize=64)
def _configured_flow(flow, max_workers: int | None, dask_address: str | None, storage: Path | None, persist):
    """``flow`` on the chosen task runner and result storage; built once per choice
    (``Flow.with_options`` validates the whole flow again, ~12 ms for the master flow). Safe to share:
    Prefect enters a duplicate of the flow's task runner for every run."""
    options = {"task_runner": make_task_runner(max_workers, dask_address)}
    if storage is not None and flow.result_storage is None:
        # Naming a storage would turn result persistence on; keep what the flow and settings say.
        options |= {"result_storage": storage, "persist_result": persist}
    return flow.with_options(**options)


def run_by_hand(flow, max_workers: int | None = None, dask_address: str | None = None, **parameters):
    """Run a photref flow from Python or the command line, and return its result.

    Parameters
    ----------
    flow : prefect.Flow
        The flow to run.
    max_workers, dask_address
        The task runner (see :func:`make_task_runner`).
    **parameters
        The flow's parameters.
    """
    if _temporary_server_needed() or temporary_server_of_this_command():
        start_temporary_server()  # a no-op wait once it answers
    with hand_run_settings(dask_address), api_client():
        persist = flow.persist_result
        if persist is None:
            persist = get_current_settings().results.persist_by_default
        configured = _configured_flow(flow, max_workers, dask_address, _result_storage(), persist)
        return configured(**parameters)
