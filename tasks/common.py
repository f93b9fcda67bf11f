"""Shared task settings: which failures are retried, and the code version that enters cache keys."""

from __future__ import annotations

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
    """Hash of the photref_core sources: a change of the science invalidates every cached result."""
    h = hashlib.sha256()
    for path in sorted(_CORE.glob("*.py")):
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
