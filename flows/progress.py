"""A progress artifact for a fan-out, updated at most about once a second.

Every update is a call to the Prefect API from the flow's thread; a fan-out of many short tasks would
otherwise make one call per task (a few ms each, plus the server's CPU on the same cores) for a bar that
nobody reads at that rate.
"""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class Progress:
    """A Prefect progress artifact over ``total`` units of work.

    Parameters
    ----------
    total : int
        Units of work (frames, images) of the whole fan-out.
    key, description : str
        Of the artifact.
    min_interval : float
        Least seconds between two updates (the last one, at 100 %, is always sent).
    """

    def __init__(self, total: int, key: str, description: str, min_interval: float = 1.0):
        self.total = max(int(total), 1)
        self.done = 0
        self.min_interval = min_interval
        self._id = create_progress_artifact(0.0, key=key, description=description)
        self._last = time.monotonic()

    def advance(self, units: int) -> None:
        """Count ``units`` more as done; update the artifact when the last update is old enough."""
        self.done += units
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            update_progress_artifact(self._id, 100.0 * min(self.done, self.total) / self.total)
            self._last = now

    def finish(self) -> None:
        """Show 100 %."""
        update_progress_artifact(self._id, 100.0)
