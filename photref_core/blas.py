"""BLAS threads for work that runs in several threads of one process at once (the PRF fit fan-out).

A BLAS library's thread count is one setting for the whole process, so concurrent tasks that each set and
restore it (``threadpoolctl.threadpool_limits``) would undo one another's limit half-way. :func:`blas_threads`
counts its holders: the first sets the limit, the last restores the library's own setting.
"""

from __future__ import annotations

import contextlib
import os
import threading

from threadpoolctl import threadpool_limits

__all__ = ["blas_threads", "threads_per_task"]

_LOCK = threading.Lock()
_HOLDERS = 0
_LIMITER = None


def threads_per_task(concurrent_tasks: int) -> int:
    """BLAS threads each of ``concurrent_tasks`` tasks running at once may use: the cores shared out,
    at least one (two tasks with the library's default threads oversubscribed 2 cores: a dense inverse
    took 432 ms instead of 258 ms)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(concurrent_tasks)))


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Limit BLAS to ``n`` threads while any holder is inside (``None``: leave the library's setting).

    Parameters
    ----------
    n : int or None
        Threads; concurrent holders should ask for the same number (the first one's is applied).
    """
    global _HOLDERS, _LIMITER
    if n is None:
        yield
        return
    with _LOCK:
        if _HOLDERS == 0:
            _LIMITER = threadpool_limits(limits=int(n), user_api="blas")
        _HOLDERS += 1
    try:
        yield
    finally:
        with _LOCK:
            _HOLDERS -= 1
            if _HOLDERS == 0:
                _LIMITER.restore_original_limits()
                _LIMITER = None
