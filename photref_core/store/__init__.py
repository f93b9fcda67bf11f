"""The data model (SPEC 2): the store's layout and schema, the frame axis and its one planner, result
groups, the run lock. No science here."""

from .._lazy import lazy_package

# Every name of the modules' __all__, imported on first use (see photref_core._lazy).
__getattr__, __dir__, __all__ = lazy_package(__name__, __file__)
