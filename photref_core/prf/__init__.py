"""PRF photometry (SPEC 6): parameters, geometry, shape model, per-frame solver, the model, the steps."""

from .._lazy import lazy_package

# Every name of the modules' __all__, imported on first use (see photref_core._lazy).
__getattr__, __dir__, __all__ = lazy_package(__name__, __file__)
