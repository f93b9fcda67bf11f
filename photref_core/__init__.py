"""photref_core: the science of photref (I/O, store, statistics, fits, master, PRF, simulation).

This package never imports Prefect: everything here is plain numpy/scipy/astropy/zarr/dask and can be
called directly from Python or from tests.
"""

__version__ = "0.1.0"
SOFTWARE = f"photref {__version__}"
