"""The sources on any frame: geometry, normalised mean model and solve plan per distinct WCS, cached.

Frames that share a pixel-to-sky mapping (:func:`~.inputs.wcs_key`) share one entry; the entries are kept
most-recently-used last, at most :data:`CACHE_SIZE` of them, the reference frame's always. Threads may
share one model (the fit tasks of a process, :func:`~.steps.shared_prf_model`): the cache is locked, so an
entry is built once, by the first thread that needs it, while the others wait for it.
"""

from __future__ import annotations

import threading

from scipy import sparse

from .geometry import Geometry, build_geometry
from .inputs import wcs_key
from .shape import model_matrix
from .solver import SolvePlan, same_pattern

__all__ = ["CACHE_SIZE", "FrameModels"]

CACHE_SIZE = 8
"""Geometries / mean models / solve plans kept per model (one per distinct WCS)."""


class FrameModels:
    """Geometry, mean model and solve plan of a field's sources on the frames of any WCS, cached.

    Parameters
    ----------
    shape : ShapeModel
        The shape model (its weights may change: call :meth:`drop_models` after).
    ra, dec : numpy.ndarray
        Source positions (degrees).
    sparse_dist_lim : float
        Radius (arcsec) of each source's pixel neighbourhood.
    wcs : astropy.wcs.WCS
        The reference WCS (the default frame, never evicted).
    image_shape : tuple of int
        (ny, nx) of the reference frame.
    """

    def __init__(self, shape, ra, dec, sparse_dist_lim, wcs, image_shape):
        self.shape = shape
        self.ra, self.dec = ra, dec
        self.sparse_dist_lim = sparse_dist_lim
        self.wcs = wcs
        self.image_shape = image_shape
        self._cache = {}
        self._keys = {}
        self._lock = threading.RLock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._cache)

    def entry(self, wcs=None, shape=None) -> dict:
        """The cache entry of a frame WCS (``wcs``, ``shape``, ``key`` and what was computed for it)."""
        with self._lock:
            wcs = self.wcs if wcs is None else wcs
            shape = self.image_shape if shape is None else tuple(int(x) for x in shape)
            memo = self._keys.get((id(wcs), shape))
            if memo is None or memo[0] is not wcs:
                memo = (wcs, wcs_key(wcs, shape))  # holds the object, so its id cannot be reused
                self._keys[(id(wcs), shape)] = memo
            key = memo[1]
            ent = self._cache.pop(key, None)
            if ent is None:
                ent = {"wcs": wcs, "shape": shape, "key": key}
            self._cache[key] = ent  # most recently used last
            if len(self._cache) > CACHE_SIZE:  # per-frame WCS lists: evict the oldest, keep the reference
                ref = self._keys.get((id(self.wcs), self.image_shape))
                for k in list(self._cache):
                    if len(self._cache) <= CACHE_SIZE:
                        break
                    if k != key and (ref is None or k != ref[1]):
                        del self._cache[k]
                if len(self._keys) > 4 * CACHE_SIZE:
                    self._keys = {k: v for k, v in self._keys.items() if v[1] in self._cache}
            return ent

    def geometry(self, wcs=None, shape=None) -> Geometry:
        """Geometry of the sources on a frame with ``wcs`` (default: the reference WCS)."""
        with self._lock:
            ent = self.entry(wcs, shape)
            if "geom" not in ent:
                ent["geom"] = build_geometry(
                    ent["wcs"], ent["shape"], self.ra, self.dec, self.sparse_dist_lim
                )
            return ent["geom"]

    def model_for(self, wcs=None, shape=None) -> sparse.csr_array:
        """The normalised mean model (nsources x npixels) on a frame with ``wcs``."""
        with self._lock:
            ent = self.entry(wcs, shape)
            if "model" not in ent:
                g = self.geometry(wcs, shape)
                ent["model"] = model_matrix(self.shape, g)
            return ent["model"]

    def plan(self, wcs=None, shape=None) -> SolvePlan:
        """The solve plan of the mean model on a frame with ``wcs`` (rebuilt when its pattern changes)."""
        with self._lock:
            ent = self.entry(wcs, shape)
            X = self.model_for(wcs, shape)
            plan = ent.get("plan")
            if plan is None or not same_pattern(plan, X):
                plan = ent["plan"] = SolvePlan(X)
                ent["plan_for"] = X
            elif ent.get("plan_for") is not X:  # the shape changed, the geometry did not: new values only
                plan.refresh(X)
                ent["plan_for"] = X
            return plan

    def drop_models(self):
        """Forget the model matrices after a change of the shape (geometry and plan structure stay)."""
        with self._lock:
            for ent in self._cache.values():
                ent.pop("model", None)
