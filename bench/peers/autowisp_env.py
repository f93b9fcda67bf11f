"""The virtual environment that holds AutoWISP 2.3.0, apart from photref's own (``bench/peers/autowisp/``).

AutoWISP pins zarr 2 and declares dependencies its master collector never uses (a C++ PSF-fitting build,
a Django web stack) that do not install here, so the environment is made in two steps that do work: AutoWISP
itself with ``--no-deps``, then the packages the collector imports (:data:`COLLECTOR_REQUIREMENTS`).
:func:`ensure_autowisp_venv` does it once, logs every command and its output to
``bench-output/autowisp-venv-install.log``, checks that the collector imports, and leaves a stamp so that
later calls return at once.

Run by hand::

    .venv/bin/python -m bench.peers.autowisp_env          # prints the peer environment's python
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

AUTOWISP_REQUIREMENT = "autowisp==2.3.0"
#: What AutoWISP's ``magnitude_fitting`` package imports, with the pins 2.3.0 needs (zarr 2 and its codecs,
#: the rechunker it calls, the ANTLR runtime its fit-terms parser was generated for).
COLLECTOR_REQUIREMENTS = (
    "numpy",
    "scipy",
    "astropy",
    "pandas",
    "h5py",
    "dask",
    "zarr==2.18.7",
    "numcodecs<0.16",
    "rechunker==0.5.4",
    "antlr4-python3-runtime==4.13.0",
    "asteval",
    "sqlalchemy",
    "alembic",
    "lxml",
    "platformdirs",
    "psutil",
    "configargparse",
)
#: The import that proves the environment works.
CHECK_IMPORT = "from autowisp.magnitude_fitting.master_photref_collector_zarr import MasterPhotrefCollector"
VENV_DIR = Path("bench") / "peers" / "autowisp"
STAMP_NAME = ".photref-peer-stamp.json"

__all__ = ["AUTOWISP_REQUIREMENT", "COLLECTOR_REQUIREMENTS", "ensure_autowisp_venv", "venv_python"]


def venv_python(venv: Path) -> Path:
    """The python executable of the virtual environment ``venv``."""
    return venv / "bin" / "python"


def _base_python() -> str:
    """AutoWISP 2.3.0 is tested on Python 3.11: ``python3.11`` when on PATH, else the running Python."""
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


def _stamp_matches(stamp: Path) -> bool:
    try:
        record = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return record.get("requirement") == AUTOWISP_REQUIREMENT and record.get("collector") == list(
        COLLECTOR_REQUIREMENTS
    )


def ensure_autowisp_venv(root: Path) -> Path:
    """Make (once) AutoWISP's virtual environment under ``root/bench/peers/autowisp`` and return its python.

    Parameters
    ----------
    root : pathlib.Path
        The repository root.

    Returns
    -------
    pathlib.Path
        The environment's python, with which ``bench/peers/autowisp_master.py`` is run.

    Raises
    ------
    RuntimeError
        When a command of the install fails (the log under ``root/bench-output`` has its output).
    """
    root = Path(root).resolve()
    venv = root / VENV_DIR
    python = venv_python(venv)
    stamp = venv / STAMP_NAME
    if python.exists() and _stamp_matches(stamp):
        return python
    out = root / "bench-output"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "autowisp-venv-install.log"
    start = time.perf_counter()
    commands = [
        [_base_python(), "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--no-deps", AUTOWISP_REQUIREMENT],
        [str(python), "-m", "pip", "install", *COLLECTOR_REQUIREMENTS],
        [str(python), "-c", CHECK_IMPORT],
    ]
    print(f"making AutoWISP's environment in {venv} (once; log: {log_path})", flush=True)
    with log_path.open("w") as log:
        for cmd in commands:
            _run_logged(cmd, log, root)
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout.split()
    record = {
        "requirement": AUTOWISP_REQUIREMENT,
        "collector": list(COLLECTOR_REQUIREMENTS),
        "commands": [shlex.join(c) for c in commands],
        "install_s": round(time.perf_counter() - start, 1),
        "freeze": freeze,
    }
    stamp.write_text(json.dumps(record, indent=2) + "\n")
    return python


if __name__ == "__main__":
    print(ensure_autowisp_venv(Path(__file__).resolve().parents[2]))
