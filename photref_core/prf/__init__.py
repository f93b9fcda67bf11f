"""PRF photometry (SPEC 6): parameters, geometry, shape model, per-frame solver, the model, the steps."""

from .._lazy import lazy_exports

# name -> submodule; imported on first use (see photref_core._lazy)
_EXPORTS = {
    "Geometry": ".geometry",
    "build_geometry": ".geometry",
    "PRFModel": ".model",
    "PSFMetrics": ".model",
    "PRFParameters": ".parameters",
    "ShapeModel": ".shape",
    "FLAG_LOW_COVERAGE": ".solver",
    "FLAG_SOLVE_FAILED": ".solver",
    "FitResult": ".solver",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
