"""One run at a time per store: an OS file lock beside the store (``<store>.lock``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time

from ..errors import StoreError
from .consolidated import ensure_consolidated
from .schema import store_url

__all__ = [
    "lock_path",
    "store_lock",
    "store_run",
]


_HELD: dict[str, list] = {}  # lock path -> [open file, depth]; re-entrant within one process


_HELD_GUARD = threading.Lock()


def lock_path(store) -> str | None:
    """The lock file of a local store (``<store>.lock`` beside it); None for remote URLs."""
    url = store_url(store)
    if "://" in url and not url.startswith("file://"):
        return None
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(path.rstrip("/")) + ".lock"


@contextlib.contextmanager
def store_lock(store, timeout: float | None = 0.0, poll: float = 0.2):
    """Hold the store's run lock: one flow run writes to a store at a time.

    An OS file lock (``flock``) on ``<store>.lock``: the kernel releases it when the holder dies, even by
    SIGKILL, so a crashed run never leaves a stale lock. Re-entrant within a process (the master flow
    holds it while its ingestion subflow takes it again). Remote fsspec stores are not locked: run one
    flow per remote store at a time.

    Parameters
    ----------
    store : str or os.PathLike
        The store.
    timeout : float or None
        Seconds to wait for another run to finish: 0 refuses at once, None waits for ever.

    Raises
    ------
    StoreError
        When another run holds the lock after ``timeout`` seconds.
    """
    path = lock_path(store)
    if path is None:
        yield
        return
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise StoreError(
                    f"{store_url(store)}: another photref run is using this store ({holder}); "
                    "wait for it to finish or pass a lock timeout"
                ) from None
            time.sleep(poll)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    handle.flush()
    with _HELD_GUARD:
        _HELD[path] = [handle, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            entry = _HELD[path]
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _HELD[path]
        if last:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


def _held(path: str | None) -> bool:
    with _HELD_GUARD:
        return path in _HELD


@contextlib.contextmanager
def store_run(store, timeout: float | None = 0.0):
    """A flow run's hold on its store: the run lock (:func:`store_lock`), and, when the outermost run
    ends well, consolidated metadata written again if the run changed the store (a writer removed it,
    see :mod:`photref_core.store.consolidated`), so ``xr.open_zarr(store)`` is silent and current.

    A run that fails or is killed writes none: the store then has none rather than a stale copy.
    """
    url = store_url(store)
    path = lock_path(url)
    with store_lock(url, timeout=timeout):
        yield
    if not _held(path):  # the outermost run of this process (a subflow's exit leaves it to its parent)
        ensure_consolidated(url)
