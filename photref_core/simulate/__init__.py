"""Simulated fields with a known truth: frame photometry and pixel frames."""

from .._lazy import lazy_exports

# name -> submodule; imported on first use (see photref_core._lazy)
_EXPORTS = {
    "simulate_images": ".images",
    "simulate_photometry": ".photometry",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
