"""PRF photometry (SPEC 6): parameters, geometry, shape model, per-frame solver, the model, the steps."""

from .geometry import Geometry, build_geometry
from .model import PRFModel, PSFMetrics
from .parameters import PRFParameters
from .shape import ShapeModel
from .solver import FLAG_LOW_COVERAGE, FLAG_SOLVE_FAILED, FitResult

__all__ = [
    "FLAG_LOW_COVERAGE",
    "FLAG_SOLVE_FAILED",
    "FitResult",
    "Geometry",
    "PRFModel",
    "PRFParameters",
    "PSFMetrics",
    "ShapeModel",
    "build_geometry",
]
