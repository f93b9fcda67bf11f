"""Result groups beside the inputs (SPEC 2): small xarray datasets written and read in one trip."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import TYPE_CHECKING

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.core.sync import sync

from .consolidated import drop_consolidated
from .schema import open_group, store_url

if TYPE_CHECKING:  # xarray (and pandas under it) costs ~0.35 s to import: only where it is used
    import xarray as xr

__all__ = [
    "RESULTS_GROUP",
    "group_exists",
    "load_group",
    "prune_results",
    "write_group",
]


RESULTS_GROUP = "results"


def write_group(store, name: str, ds: xr.Dataset) -> None:
    """Write a small in-memory result dataset as a store group, the way ``Dataset.to_zarr`` lays it out.

    ``to_zarr`` creates each array, writes its chunk and then rewrites its metadata with the attributes,
    one array after the other (~45 ms for the dozen small arrays of a statistics group here). This writes
    the same layout -- one chunk per array, ``dimension_names``, the ``coordinates`` attribute of data
    variables, ``_FillValue`` (base64, as xarray encodes it for zarr v3) for floats -- with each array
    created with its attributes and all arrays written at once. Datasets holding dask arrays (the
    out-of-core statistics) or Python objects go through ``to_zarr`` itself.
    """
    url = store_url(store)
    drop_consolidated(url)  # before anything changes (see photref_core.store.consolidated)

    def plain(var: xr.Variable) -> bool:
        if var.chunks is not None:
            return False
        if var.dtype.kind == "O":  # strings as Python objects: to_zarr writes them as zarr strings
            return all(isinstance(x, str) for x in var.values.ravel())
        return var.dtype.kind in "biufT"

    if not all(plain(v) for v in ds.variables.values()):  # dask arrays, fixed-width or other objects
        ds.to_zarr(url, group=name, mode="w", consolidated=False)
        return
    coordinates = [c for c in ds.coords if c not in ds.dims]

    def attributes(var_name: str, var: xr.Variable) -> dict:
        attrs = dict(var.attrs)
        if var_name not in ds.coords:
            linked = [c for c in coordinates if set(ds[c].dims) <= set(var.dims)]
            if linked:
                attrs["coordinates"] = " ".join(linked)
        if var.dtype.kind == "f":  # xarray encodes a float fill value as a little-endian double
            attrs["_FillValue"] = base64.b64encode(np.array(np.nan, dtype="<f8").tobytes()).decode()
        return attrs

    async def write_array(group, var_name: str, var: xr.Variable) -> None:
        values = var.values
        if values.dtype.kind == "O":
            values = values.astype(np.dtypes.StringDType())
        fill = {"f": np.nan, "T": ""}.get(values.dtype.kind, 0)
        array = await group.create_array(
            var_name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=tuple(max(1, n) for n in values.shape),
            fill_value=False if values.dtype.kind == "b" else fill,
            dimension_names=list(var.dims),
            attributes=attributes(var_name, var),
        )
        if values.size:
            await array.setitem(Ellipsis, values)

    async def write_all() -> None:
        group = await zarr.api.asynchronous.open_group(
            store=url, path=name, mode="w", attributes=dict(ds.attrs)
        )
        # Every write finishes before an error is raised: a retry must not meet stray writes of this one.
        results = await asyncio.gather(
            *(write_array(group, n, v) for n, v in ds.variables.items()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    sync(write_all())


def load_group(store, name: str) -> xr.Dataset:
    """A result group of the store (statistics, fit), read into memory (without dask: the groups are
    small, one chunk per variable)."""
    import xarray as xr

    return xr.open_zarr(os.fspath(store), group=name, consolidated=False, chunks=None).load()


def prune_results(store, keep: set[str]) -> list[str]:
    """Delete result groups not named in ``keep`` (old parameter sets); returns the deleted names."""
    group = open_group(store, mode="r+")
    if RESULTS_GROUP not in group:
        return []
    results = group[RESULTS_GROUP]
    deleted = []
    for name in list(results.group_keys()):
        full = f"{RESULTS_GROUP}/{name}"
        if full not in keep:
            del results[name]
            deleted.append(full)
    return deleted


def group_exists(store, name: str) -> bool:
    """Whether a group (e.g. a cached step's result) is in the store."""
    try:
        open_group(store, path=name, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return False
    return True
