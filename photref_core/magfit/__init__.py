"""Magnitude fitting (SPEC 9): the per-frame fit against a reference, AutoWISP's loop of fits and masters,
and its parameters."""

from .._lazy import lazy_package

# Every name of the modules' __all__, imported on first use (see photref_core._lazy).
__getattr__, __dir__, __all__ = lazy_package(__name__, __file__)
