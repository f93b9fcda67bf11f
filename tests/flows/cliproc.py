"""The ``photref`` command as a process, for the tests of ``photref server`` (as a user runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def photref(args, env, timeout=180) -> subprocess.CompletedProcess:
    """Run ``photref ARGS`` (``python -m flows.cli``) in the repository with ``env``; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
