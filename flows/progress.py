"""A fan-out's progress: a Prefect progress artifact, updated at most about once a second, and a bar in
the terminal when the run was started from one.

Every update of the artifact is a call to the Prefect API from the flow's thread; a fan-out of many short
tasks would otherwise make one call per task (a few ms each, plus the server's CPU on the same cores) for a
bar that nobody reads at that rate. The terminal bar (rich, which Prefect already uses) is drawn on stderr
only when stderr is a terminal: a deployment run, a test or a redirected command shows none.
"""

from __future__ import annotations

import sys
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed


class Progress:
    """A Prefect progress artifact over ``total`` units of work, and a terminal bar.

    Parameters
    ----------
    total : int
        Units of work (frames, images) of the whole fan-out.
    key, description : str
        Of the artifact; ``description`` also labels the terminal bar.
    min_interval : float
        Least seconds between two updates of the artifact (the last one, at 100 %, is always sent).
    console : rich.console.Console, optional
        Where the terminal bar goes (default: stderr, and only when it is a terminal).
    """

    def __init__(self, total: int, key: str, description: str, min_interval: float = 1.0, console=None):
        self.total = max(int(total), 1)
        self.done = 0
        self.min_interval = min_interval
        self._id = create_progress_artifact(0.0, key=key, description=description)
        self._last = time.monotonic()
        self._bar = None
        if console is not None or sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=int(total))

    def advance(self, units: int) -> None:
        """Count ``units`` more as done: the terminal bar at once, the artifact when its last update is
        old enough."""
        self.done += units
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            update_progress_artifact(self._id, 100.0 * min(self.done, self.total) / self.total)
            self._last = now

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.finish()
        elif self._bar is not None:  # a failed fan-out: the terminal bar is closed where it stopped
            self._bar.stop()
            self._bar = None

    def gather(self, futures) -> list:
        """The results of writer-batch futures (each a list, one item per unit), in the order they
        complete, advancing the progress by each batch's length."""
        results = []
        for future in as_completed(futures):
            batch = future.result()
            results.extend(batch)
            self.advance(len(batch))
        return results

    def finish(self) -> None:
        """Show 100 %, and close the terminal bar."""
        update_progress_artifact(self._id, 100.0)
        if self._bar is not None:
            self._bar.update(self._task, completed=self._bar.tasks[0].total)
            self._bar.stop()
            self._bar = None
