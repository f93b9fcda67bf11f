"""photref_core: the science of photref, one subpackage per pipeline around the store.

``store`` (the data model), ``ingest`` (files -> store), ``master`` (SPEC 3-5), ``prf`` (SPEC 6),
``simulate`` (fields with a known truth); ``errors``, ``catalog``, ``keys`` (every cache key) and
``_atomic`` (atomic writes) serve them all.

This package never imports Prefect: everything here is plain numpy/scipy/astropy/zarr/dask and can be
called directly from Python or from tests.
"""

__version__ = "0.1.0"
SOFTWARE = f"photref {__version__}"

__all__ = ["SOFTWARE", "__version__"]
