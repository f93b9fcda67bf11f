"""Consolidated metadata: what makes a plain ``xr.open_zarr(store)`` silent and fast, never stale.

xarray's ``open_zarr`` looks for consolidated metadata first (all the hierarchy's metadata copied into
the root ``zarr.json``) and warns when there is none. A copy is also a hazard: a reader trusts it, so it
must never describe a store that has changed since. photref keeps one rule:

* consolidated metadata exists only while it is current. Every photref writer removes it before it
  changes anything (:func:`photref_core.store.schema.open_group` in a writing mode does that first),
  and the run that changed the store writes it again when it ends well
  (:func:`photref_core.store.lock.store_run`);
* so a run killed half-way leaves none (plain opens are slower and warn, but are right), never a stale one;
* photref's own readers never use it (``use_consolidated=False``): they are correct whatever a user's own
  tools did to the store.
"""

from __future__ import annotations

import json
import os
import warnings

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .._atomic import atomic_write

__all__ = ["consolidate", "drop_consolidated", "ensure_consolidated", "is_consolidated"]

_KEY = "consolidated_metadata"


def _local_root(url: str) -> str | None:
    """The directory of a local store, None for a remote URL."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else url


def _read_root(url: str) -> tuple[dict | None, object]:
    """The root ``zarr.json`` as a dict (None when there is no store), and the store to write it back."""
    root = _local_root(url)
    if root is not None:
        try:
            with open(os.path.join(root, "zarr.json"), "rb") as stream:
                return json.loads(stream.read()), None
        except FileNotFoundError:
            return None, None
    try:
        store = zarr.open_group(url, mode="r+", use_consolidated=False).store
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None, None
    buffer = sync(store.get("zarr.json", prototype=default_buffer_prototype()))
    return (None if buffer is None else json.loads(buffer.to_bytes())), store


def is_consolidated(url: str) -> bool:
    """Whether the store at ``url`` (its :func:`~photref_core.store.schema.store_url`) has consolidated
    metadata."""
    metadata, _ = _read_root(url)
    return metadata is not None and metadata.get(_KEY) is not None


def drop_consolidated(url: str) -> bool:
    """Remove the store's consolidated metadata before anything in it changes. Returns whether there was
    any. The root ``zarr.json`` is replaced atomically (a local store), so a crash leaves the old or the
    new one, never a torn file."""
    metadata, store = _read_root(url)
    if metadata is None or metadata.get(_KEY) is None:
        return False
    metadata.pop(_KEY)
    data = json.dumps(metadata, indent=2).encode()
    root = _local_root(url)
    if root is not None:
        atomic_write(os.path.join(root, "zarr.json"), lambda stream: stream.write(data))
    else:  # object stores replace a key whole
        sync(store.set("zarr.json", default_buffer_prototype().buffer.from_bytes(data)))
    return True


def consolidate(url: str) -> None:
    """Write the store's consolidated metadata (every group and array in it), for ``xr.open_zarr``."""
    with warnings.catch_warnings():
        # "not part of the Zarr format 3 specification": xarray and zarr-python read it; others ignore it.
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(url)


def ensure_consolidated(url: str) -> bool:
    """Consolidate the store when it exists and has no consolidated metadata (a run changed it). Returns
    whether it wrote any."""
    metadata, _ = _read_root(url)
    if metadata is None or metadata.get(_KEY) is not None:
        return False
    consolidate(url)
    return True
