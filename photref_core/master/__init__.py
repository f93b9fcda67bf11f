"""The master photometric reference (SPEC 3-5): parameters, statistics with rejection, fit terms, scatter
fit, the steps over the store, the FITS files and the plots."""

from .fits import read_master, write_master, write_statistics_table
from .fitterms import DEFAULT_FIT_TERMS, FitTerms, parse_fit_terms
from .parameters import MASTER_DEFAULTS, MasterParameters
from .scatter import ScatterFitParameters, fit_scatter
from .stats import RejectionParameters, source_statistics, source_statistics_dask
from .steps import build_master, compute_statistics, fit_statistics, validate_fit_terms, write_products

__all__ = [
    "DEFAULT_FIT_TERMS",
    "MASTER_DEFAULTS",
    "FitTerms",
    "MasterParameters",
    "RejectionParameters",
    "ScatterFitParameters",
    "build_master",
    "compute_statistics",
    "fit_scatter",
    "fit_statistics",
    "parse_fit_terms",
    "read_master",
    "source_statistics",
    "source_statistics_dask",
    "validate_fit_terms",
    "write_master",
    "write_products",
    "write_statistics_table",
]
