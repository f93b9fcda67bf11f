"""Lazy re-exports for the subpackages' ``__init__`` (PEP 562).

A subpackage re-exports its public names, but importing ``photref_core.master.parameters`` must not
import the plots (matplotlib), the FITS writer and xarray with it: a cached ``photref master`` process
needs little of them, and every import is paid by every command. The names resolve on first use.
"""

from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``exports[name]`` (a submodule, relative
    like ``.fits``) when ``name`` is first asked for."""

    def __getattr__(name: str):
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(module, package), name)

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
