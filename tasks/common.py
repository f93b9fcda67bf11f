"""Shared task settings: which failures are retried (transient I/O only)."""

from __future__ import annotations

from photref_core.errors import is_transient

__all__ = ["IO_RETRIES", "IO_RETRY", "IO_RETRY_DELAYS", "retry_on_transient_io"]


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient I/O errors only, never bad input or bugs."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


IO_RETRIES = 3
IO_RETRY_DELAYS = [0.5, 2, 5]

# Task options of every step that reads or writes files: retried on transient I/O errors only.
IO_RETRY = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS,
    "retry_condition_fn": retry_on_transient_io,
}
