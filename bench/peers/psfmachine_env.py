"""The virtual environment that holds psfmachine 1.1.4 (``bench/peers/psfmachine/``), apart from photref's.

psfmachine 1.1.4 pins numpy < 2, pandas < 2 and astropy < 6 and needs Python 3.11: it cannot share the
project's environment. :func:`ensure_psfmachine_venv` makes it once
(:func:`bench.peers.venvs.ensure_peer_venv`: logged to ``bench-output/psfmachine-venv-install.log``,
checked by importing ``Machine``, stamped).

Run by hand::

    .venv/bin/python -m bench.peers.psfmachine_env        # prints the peer environment's python
"""

from __future__ import annotations

from pathlib import Path

from bench.peers.venvs import ensure_peer_venv

PSFMACHINE_REQUIREMENT = "psfmachine==1.1.4"
CHECK_IMPORT = "from psfmachine.machine import Machine"

__all__ = ["PSFMACHINE_REQUIREMENT", "ensure_psfmachine_venv"]


def ensure_psfmachine_venv(root: Path) -> Path:
    """Make (once) psfmachine's virtual environment under ``root/bench/peers/psfmachine``; its python, with
    which ``bench/peers/psfmachine_fit.py`` is run."""
    return ensure_peer_venv(root, "psfmachine", [[PSFMACHINE_REQUIREMENT]], CHECK_IMPORT)


if __name__ == "__main__":
    print(ensure_psfmachine_venv(Path(__file__).resolve().parents[2]))
