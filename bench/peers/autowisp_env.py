"""The virtual environment that holds AutoWISP 2.3.0, apart from photref's own (``bench/peers/autowisp/``).

AutoWISP pins zarr 2 and declares dependencies its master collector never uses (a C++ PSF-fitting build,
a Django web stack) that do not install here, so the environment is made in two steps that do work: AutoWISP
itself with ``--no-deps``, then the packages the collector imports (:data:`COLLECTOR_REQUIREMENTS`).
:func:`ensure_autowisp_venv` does it once (:func:`bench.peers.venvs.ensure_peer_venv`: logged to
``bench-output/autowisp-venv-install.log``, checked by importing the collector, stamped).

Run by hand::

    .venv/bin/python -m bench.peers.autowisp_env          # prints the peer environment's python
"""

from __future__ import annotations

from pathlib import Path

from bench.peers.venvs import ensure_peer_venv

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

__all__ = ["AUTOWISP_REQUIREMENT", "COLLECTOR_REQUIREMENTS", "ensure_autowisp_venv"]


def ensure_autowisp_venv(root: Path) -> Path:
    """Make (once) AutoWISP's virtual environment under ``root/bench/peers/autowisp``; its python, with
    which ``bench/peers/autowisp_master.py`` is run."""
    installs = [["--no-deps", AUTOWISP_REQUIREMENT], list(COLLECTOR_REQUIREMENTS)]
    return ensure_peer_venv(root, "autowisp", installs, CHECK_IMPORT)


if __name__ == "__main__":
    print(ensure_autowisp_venv(Path(__file__).resolve().parents[2]))
