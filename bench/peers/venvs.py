"""Virtual environments for the peers the benches run, apart from photref's own (``bench/peers/<name>/``).

A peer pins what photref cannot share (AutoWISP zarr 2, psfmachine numpy < 2), so each lives in its own
git-ignored environment, made on first use by :func:`ensure_peer_venv`: every command and its output go to a
log under ``bench-output/``, an import proves the environment works, and a stamp (the recipe and ``pip
freeze``) lets later calls return at once while the recipe is unchanged.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ensure_peer_venv", "venv_python"]

STAMP_NAME = ".photref-peer-stamp.json"


def venv_python(venv: Path) -> Path:
    """The python executable of the virtual environment ``venv``."""
    return venv / "bin" / "python"


def base_python() -> str:
    """The peers are tested on Python 3.11: ``python3.11`` when on PATH, else the running Python."""
    return shutil.which("python3.11") or sys.executable


def _run_logged(cmd: list[str], log, cwd: Path) -> None:
    """Run ``cmd``, appending the command line and its output to ``log``; raise when it fails."""
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False)
    log.write(f"# exit {proc.returncode} after {time.perf_counter() - start:.1f} s\n\n")
    log.flush()
    if proc.returncode:
        raise RuntimeError(f"command failed (exit {proc.returncode}), see {log.name}: {shlex.join(cmd)}")


def ensure_peer_venv(root: Path, name: str, installs: list[list[str]], check_import: str) -> Path:
    """Make (once) the environment ``root/bench/peers/<name>`` and return its python.

    Parameters
    ----------
    root : pathlib.Path
        The repository root.
    name : str
        The peer's directory under ``bench/peers/`` (and its log, ``bench-output/<name>-venv-install.log``).
    installs : list of list of str
        ``pip install`` arguments, one list per command, in order.
    check_import : str
        Python code that imports what the bench calls.

    Returns
    -------
    pathlib.Path
        The environment's python.

    Raises
    ------
    RuntimeError
        When a command fails (the log has its output).
    """
    root = Path(root).resolve()
    venv = root / "bench" / "peers" / name
    python = venv_python(venv)
    stamp = venv / STAMP_NAME
    recipe = {"installs": installs, "check": check_import}
    try:
        if python.exists() and json.loads(stamp.read_text()).get("recipe") == recipe:
            return python
    except (OSError, ValueError):
        pass
    out = root / "bench-output"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{name}-venv-install.log"
    start = time.perf_counter()
    commands = [[base_python(), "-m", "venv", "--clear", str(venv)]]
    commands += [[str(python), "-m", "pip", "install", *args] for args in installs]
    commands.append([str(python), "-c", check_import])
    print(f"making {name}'s environment in {venv} (once; log: {log_path})", flush=True)
    with log_path.open("w") as log:
        for cmd in commands:
            _run_logged(cmd, log, root)
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout.split()
    record = {
        "recipe": recipe,
        "commands": [shlex.join(c) for c in commands],
        "install_s": round(time.perf_counter() - start, 1),
        "freeze": freeze,
    }
    stamp.write_text(json.dumps(record, indent=2) + "\n")
    return python
