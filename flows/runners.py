"""Task-runner choice for every flow: a bounded thread pool here, or an existing Dask cluster.

``ThreadPoolTaskRunner`` is unbounded by default; photref always bounds it (``max_workers``). With a
``dask_address`` ("tcp://host:8786") the tasks run on that ``distributed`` scheduler instead.
"""

from __future__ import annotations

import os

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
