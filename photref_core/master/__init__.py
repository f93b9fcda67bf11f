"""The master photometric reference (SPEC 3-5): parameters, statistics with rejection, fit terms, scatter
fit, the steps over the store, the FITS files and the plots."""

from .._lazy import lazy_package

# Every name of the modules' __all__, imported on first use (see photref_core._lazy).
__getattr__, __dir__, __all__ = lazy_package(__name__, __file__)
