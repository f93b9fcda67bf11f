"""Lazy re-exports for the subpackages' ``__init__`` (PEP 562), generated from the modules' ``__all__``.

A subpackage re-exports every public name of its modules (each module's ``__all__``), but importing
``photref_core.master.parameters`` must not import the plots (matplotlib), the FITS writer and xarray with
it: a cached ``photref master`` process needs little of them, and every import is paid by every command.
So the ``__init__`` reads each module's ``__all__`` as text (no import) and resolves a name on first use.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

__all__ = ["lazy_package", "public_names"]

# ``__all__ = [ ... ]`` (or a tuple) at the start of a line, up to its closing bracket.
_ALL = re.compile(r"^__all__\s*=\s*([\[(].*?[\])])", re.MULTILINE | re.DOTALL)


def public_names(package_file: str) -> dict[str, str]:
    """``{name: ".module"}`` for every name in the ``__all__`` of the modules beside ``package_file``.

    Modules whose name starts with ``_`` are private and left out.

    Raises
    ------
    ImportError
        When two modules export the same name (the face would be ambiguous) or a module has no literal
        ``__all__``.
    """
    exports: dict[str, str] = {}
    for path in sorted(Path(package_file).parent.glob("*.py")):
        if path.name.startswith("_"):
            continue
        match = _ALL.search(path.read_text())
        if match is None:
            raise ImportError(f"{path}: no literal __all__ to re-export")
        for name in ast.literal_eval(match.group(1)):
            if name in exports:
                raise ImportError(f"{name!r} is exported by both {exports[name]} and .{path.stem}")
            exports[name] = "." + path.stem
    return exports


def lazy_package(package: str, package_file: str):
    """``__getattr__``, ``__dir__`` and ``__all__`` of ``package``: every public name of its modules,
    each imported from its module when first asked for.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    package_file : str
        The package's ``__file__`` (its ``__init__.py``).
    """
    exports = public_names(package_file)

    def __getattr__(name: str):
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(module, package), name)

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)
