"""Per-source pixel neighbourhoods on the tangent plane (SPEC 6 geometry), stored sparse.

For every source, the frame pixels whose centres lie within ``sparse_dist_lim`` arcsec, with their offsets
on the tangent plane at the source (gnomonic standard coordinates: ``xi ~ dra cos(dec)`` east,
``eta ~ ddec`` north, exact for any separation and pole-safe), ``r = hypot(xi, eta)`` (arcsec) and
``phi = arctan2(eta, xi)``: flat arrays of (source, pixel) pairs sorted by source (the CSR layout of a
sparse nsources x npixels matrix), built vectorised (no Python loop over sources).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

__all__ = [
    "Geometry",
    "RAD2ARCSEC",
    "build_geometry",
    "gnomonic",
]


RAD2ARCSEC = 180.0 / math.pi * 3600.0


def gnomonic(ra0, dec0, ra, dec):
    """Standard coordinates (xi east, eta north; arcsec) of (ra, dec) on the tangent plane at (ra0, dec0)."""
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    da = a - a0
    cd, sd, cd0, sd0, cda = np.cos(d), np.sin(d), np.cos(d0), np.sin(d0), np.cos(da)
    cosc = sd0 * sd + cd0 * cd * cda
    xi = cd * np.sin(da) / cosc
    eta = (cd0 * sd - sd0 * cd * cda) / cosc
    return xi * RAD2ARCSEC, eta * RAD2ARCSEC


@dataclass(eq=False)
class Geometry:
    """(source, pixel) pairs within ``dist_lim`` of each source, sorted by source (CSR layout).

    Attributes
    ----------
    shape : tuple of int
        Frame shape (ny, nx); pixels are flattened row-major (``p = y * nx + x``).
    src, pix : numpy.ndarray
        Source index and flat pixel index of every pair.
    xi, eta, r, phi : numpy.ndarray
        Tangent-plane offsets of the pixel centre from the source (arcsec), radius (arcsec), angle (rad,
        from +xi (east) towards +eta (north)).
    indptr : numpy.ndarray
        CSR row pointer: the pairs of source ``i`` are ``indptr[i]:indptr[i+1]``.
    jac : numpy.ndarray
        (nsources, 2, 2) d(xi, eta)/d(x, y) at each source (arcsec per pixel).
    area : numpy.ndarray
        Pixel area at each source (arcsec^2).
    xpix, ypix : numpy.ndarray
        Source positions in 0-based pixel coordinates.
    """

    shape: tuple
    src: np.ndarray
    pix: np.ndarray
    xi: np.ndarray
    eta: np.ndarray
    r: np.ndarray
    phi: np.ndarray
    indptr: np.ndarray
    jac: np.ndarray
    area: np.ndarray
    xpix: np.ndarray
    ypix: np.ndarray

    @property
    def nsources(self) -> int:
        """Number of sources."""
        return self.area.size

    @property
    def npixels(self) -> int:
        """Number of frame pixels."""
        return int(self.shape[0] * self.shape[1])

    def matrix(self, values, select=None) -> sparse.csr_array:
        """A sparse (nsources x npixels) matrix with ``values`` at the pairs (optionally a subset).

        Parameters
        ----------
        values : array_like
            One value per pair (or a scalar).
        select : numpy.ndarray of bool, optional
            Pairs to keep.

        Returns
        -------
        scipy.sparse.csr_array
        """
        values = np.broadcast_to(np.asarray(values), self.src.shape)
        src, pix = self.src, self.pix
        if select is not None:
            src, pix, values = src[select], pix[select], values[select]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=self.nsources))])
        return sparse.csr_array((np.asarray(values), pix, indptr), shape=(self.nsources, self.npixels))


def build_geometry(wcs, shape, ra, dec, dist_lim, chunk_pairs=4_000_000) -> Geometry:
    """Pixels within ``dist_lim`` arcsec of every source, with tangent-plane offsets (vectorised).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS of the frame.
    shape : tuple of int
        Frame shape (ny, nx).
    ra, dec : array_like
        Source positions (degrees).
    dist_lim : float
        Neighbourhood radius (arcsec).
    chunk_pairs : int
        Candidate pairs handled at once (memory bound; each chunk is one vectorised step).

    Returns
    -------
    Geometry
    """
    ny, nx = int(shape[0]), int(shape[1])
    ra = np.asarray(ra, dtype=float)
    dec = np.asarray(dec, dtype=float)
    ns = ra.size
    with np.errstate(invalid="ignore"):
        xs, ys = wcs.all_world2pix(ra, dec, 0)
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    # Local Jacobian d(xi, eta)/d(x, y) at each source, by central differences of the WCS.
    h = 0.5
    px = np.concatenate([xs + h, xs - h, xs, xs])
    py = np.concatenate([ys, ys, ys + h, ys - h])
    wra, wdec = wcs.all_pix2world(px, py, 0)
    xi, eta = gnomonic(np.tile(ra, 4), np.tile(dec, 4), wra, wdec)
    xi, eta = xi.reshape(4, ns), eta.reshape(4, ns)
    jac = np.empty((ns, 2, 2))
    jac[:, 0, 0] = (xi[0] - xi[1]) / (2 * h)
    jac[:, 1, 0] = (eta[0] - eta[1]) / (2 * h)
    jac[:, 0, 1] = (xi[2] - xi[3]) / (2 * h)
    jac[:, 1, 1] = (eta[2] - eta[3]) / (2 * h)
    area = np.abs(jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0])
    ok = np.isfinite(xs) & np.isfinite(ys) & np.isfinite(area) & (area > 0)
    # Box half-size in pixels: dist_lim over the smallest local pixel scale (+1 for rounding).
    with np.errstate(invalid="ignore", divide="ignore"):
        smin = np.sqrt(np.linalg.eigvalsh(np.einsum("sji,sjk->sik", jac, jac))[:, 0])
    smin_ok = smin[ok & (smin > 0)]
    half = int(np.ceil(dist_lim / smin_ok.min())) + 1 if smin_ok.size else 0
    off = np.arange(-half, half + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    # Sources whose box misses the frame entirely contribute nothing.
    cx, cy = np.rint(np.where(ok, xs, -1e9)), np.rint(np.where(ok, ys, -1e9))
    near = ok & (cx + half >= 0) & (cx - half < nx) & (cy + half >= 0) & (cy - half < ny)
    idx = np.flatnonzero(near)
    step = max(1, chunk_pairs // max(ox.size, 1))
    # Candidates: in the frame and, with the local Jacobian, within dist_lim (+ 1.5 px of slack for
    # rounding and distortion across the box); the exact test on the sky comes after.
    smax = np.sqrt(np.sum(jac**2, axis=(1, 2)))  # >= the largest local pixel scale
    lim2 = (dist_lim + 1.5 * smax) ** 2

    def candidates(sel):
        bx = cx[sel, None] + ox[None, :]
        by = cy[sel, None] + oy[None, :]
        dx = bx - xs[sel, None]
        dy = by - ys[sel, None]
        J = jac[sel]
        ax = J[:, 0, 0, None] * dx + J[:, 0, 1, None] * dy
        ay = J[:, 1, 0, None] * dx + J[:, 1, 1, None] * dy
        keep = (bx >= 0) & (bx < nx) & (by >= 0) & (by < ny) & (ax * ax + ay * ay <= lim2[sel, None])
        s = np.broadcast_to(sel[:, None], bx.shape)[keep]
        return s, (by[keep] * nx + bx[keep]).astype(np.int64)

    # World coordinates only of the pixels some source may reach (all of them in a crowded field).
    used = np.zeros(ny * nx, bool)
    for start in range(0, idx.size, step):
        used[candidates(idx[start : start + step])[1]] = True
    upix = np.flatnonzero(used)
    slot = np.full(ny * nx, -1, np.int64)
    slot[upix] = np.arange(upix.size)
    pra, pdec = wcs.all_pix2world((upix % nx).astype(float), (upix // nx).astype(float), 0)
    del used
    parts = []
    for start in range(0, idx.size, step):  # chunks of sources, each fully vectorised
        s, p = candidates(idx[start : start + step])
        pxi, peta = gnomonic(ra[s], dec[s], pra[slot[p]], pdec[slot[p]])
        r = np.hypot(pxi, peta)
        keep = r <= dist_lim
        parts.append((s[keep], p[keep], pxi[keep], peta[keep], r[keep]))
    if parts:
        src, pix, pxi, peta, r = (np.concatenate(a) for a in zip(*parts, strict=True))
    else:
        src = np.zeros(0, np.int64)
        pix = np.zeros(0, np.int64)
        pxi = peta = r = np.zeros(0)
    src = src.astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=ns))]).astype(np.int64)
    return Geometry(
        shape=(ny, nx),
        src=src,
        pix=pix,
        xi=pxi,
        eta=peta,
        r=r,
        phi=np.arctan2(peta, pxi),
        indptr=indptr,
        jac=jac,
        area=area,
        xpix=xs,
        ypix=ys,
    )
