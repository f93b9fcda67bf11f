"""The master photometric reference (SPEC 3-5): parameters, statistics with rejection, fit terms, scatter
fit, the steps over the store, the FITS files and the plots."""

from .._lazy import lazy_exports

# name -> submodule; imported on first use (see photref_core._lazy)
_EXPORTS = {
    "read_master": ".fits",
    "write_master": ".fits",
    "write_statistics_table": ".fits",
    "DEFAULT_FIT_TERMS": ".fitterms",
    "FitTerms": ".fitterms",
    "parse_fit_terms": ".fitterms",
    "MASTER_DEFAULTS": ".parameters",
    "MasterParameters": ".parameters",
    "ScatterFitParameters": ".scatter",
    "fit_scatter": ".scatter",
    "RejectionParameters": ".stats",
    "source_statistics": ".stats",
    "source_statistics_dask": ".stats",
    "build_master": ".steps",
    "compute_statistics": ".steps",
    "fit_statistics": ".steps",
    "validate_fit_terms": ".steps",
    "write_products": ".steps",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
