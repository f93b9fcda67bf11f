"""Files (and arrays) -> the store: readers, frame photometry, images; thin rules over the one planner."""

from .._lazy import lazy_package

# Every name of the modules' __all__, imported on first use (see photref_core._lazy).
__getattr__, __dir__, __all__ = lazy_package(__name__, __file__)
