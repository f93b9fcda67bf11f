"""Shared task settings: which failures are retried, and the code version that enters cache keys."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from photref_core.io import is_transient

_CORE = Path(__file__).resolve().parent.parent / "photref_core"


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient I/O errors only, never bad input or bugs."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


def code_version() -> str:
    """Hash of the photref_core sources: a change of the science invalidates every cached result.

    Hashed again only when a source file's name, mtime or size changes (every cache key asks for it, so
    a cached re-run would otherwise read and hash the whole package three times).
    """
    files = sorted(_CORE.glob("*.py"))
    return _hash_sources(tuple((path, path.stat().st_mtime_ns, path.stat().st_size) for path in files))


@functools.lru_cache(maxsize=4)
def _hash_sources(files: tuple[tuple[Path, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


IO_RETRIES = 3
IO_RETRY_DELAYS = [0.5, 2, 5]

# Task options of every step that reads or writes files: retried on transient I/O errors only.
IO_RETRY = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS,
    "retry_condition_fn": retry_on_transient_io,
}
