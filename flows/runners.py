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
"""

from __future__ import annotations

import contextlib
import os

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

DEFAULT_MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))


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


@contextlib.contextmanager
def hand_run_settings():
    """Prefect settings for flow runs started by hand: no flow-run heartbeat, unless one is configured.

    The environment variable cannot say "no heartbeat" (Prefect reads it as an integer >= 30), so this is
    a temporary settings context around the flow call.
    """
    if heartbeat_configured():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


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
    runner = make_task_runner(max_workers, dask_address)
    with hand_run_settings():
        return flow.with_options(task_runner=runner)(**parameters)
