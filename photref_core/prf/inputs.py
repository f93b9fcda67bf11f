"""The PRF model's inputs: frame stacks, masks, one WCS per frame, the reference image(s) of the shape fit.

Checks that name what is wrong, and the reduction of the frames to the reference image(s): one frame, or
the mean of the selected frames per distinct WCS (:func:`wcs_key`).
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from ..errors import BadInputError
from ..ingest.readers import default_error

__all__ = [
    "as_stack",
    "check_catalog",
    "check_frames",
    "check_sources",
    "frame_stacks",
    "gather_pixels",
    "mask_stack",
    "reference_epochs",
    "wcs_key",
    "per_frame_wcs",
]


def wcs_key(wcs, shape) -> str:
    """Identity of a frame's pixel-to-sky mapping: the sky positions of a 9 x 9 grid of pixels.

    Numeric rather than the header text, so that WCS objects read from frames that differ only in time
    keywords (MJD-OBS, DATE-OBS, ...) share one geometry, mean model and solve plan.
    """
    ny, nx = (int(s) for s in shape)
    gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, 9), np.linspace(-0.5, ny - 0.5, 9))
    with np.errstate(invalid="ignore"):
        ra, dec = wcs.celestial.all_pix2world(gx.ravel(), gy.ravel(), 0)
    sky = np.round(np.concatenate([ra, dec]), 10)  # 1e-10 deg = 0.4 micro-arcsec
    return f"{ny}x{nx}|" + sky.tobytes().hex()


def as_stack(a, name, dtype=None):
    """``a`` as a (nframes, ny, nx) stack (one image becomes a stack of one); ``name`` is named in errors."""
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(
            f"{name} must be an image (ny, nx) or a stack (nframes, ny, nx), got shape {a.shape}"
        )
    return a


def gather_pixels(F, E, M, pix):
    """Data, inverse variances (0 on bad pixels) and the good map at ``pix`` (all if None), in float64."""
    if pix is not None:
        F, E = F[:, pix], E[:, pix]
        M = None if M is None else M[:, pix]
    F = np.asarray(F, dtype=float)
    E = np.asarray(E, dtype=float)
    good = np.isfinite(F) & np.isfinite(E) & (E > 0)
    if M is not None:
        good &= ~M
    with np.errstate(divide="ignore", invalid="ignore"):
        W = np.where(good, 1.0 / (E * E), 0.0)
    return np.where(good, F, 0.0), W, good


def frame_stacks(flux, flux_err, mask, gain: float, rdnoise: float):
    """The frames, their errors and their bad-pixel mask as stacks of one shape (:func:`as_stack`,
    :func:`mask_stack`); ``flux_err`` None: :func:`~photref_core.ingest.readers.default_error` with
    ``gain`` and ``rdnoise``.

    Raises
    ------
    ValueError
        When the errors or the mask do not have the frames' shape.
    """
    flux = as_stack(flux, "flux")
    err = default_error(flux, gain, rdnoise) if flux_err is None else as_stack(flux_err, "flux_err")
    if err.shape != flux.shape:
        raise ValueError(f"flux_err shape {err.shape} differs from flux shape {flux.shape}")
    return flux, err, mask_stack(mask, flux.shape)


def mask_stack(mask, shape):
    """The bad-pixel mask as a bool stack of the frames' shape (one (ny, nx) mask serves every frame)."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 2:
        m = np.broadcast_to(m, shape)
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} does not match the frames {shape}")
    return m != 0


def per_frame_wcs(wcs, nt):
    """One celestial WCS per frame (one given for all, or one each)."""
    if isinstance(wcs, list | tuple):
        if len(wcs) != nt:
            raise ValueError(f"{len(wcs)} WCS given for {nt} frames")
        out = list(wcs)
    else:
        out = [wcs] * nt
    for w in out:
        if not isinstance(w, WCS) or not w.has_celestial:
            raise ValueError("every frame needs a celestial astropy.wcs.WCS")
    return out


def reference_epochs(flux, err, mask, wcs_list, tm, frame_index):
    """Reference image(s) for the shape model: one frame, or the mean of the selected frames per WCS."""
    nt, ny, nx = flux.shape
    if frame_index != "mean":
        t = int(frame_index) % nt
        good = np.isfinite(flux[t]) & np.isfinite(err[t]) & (err[t] > 0)
        if mask is not None:
            good &= ~mask[t]
        return [
            {
                "wcs": wcs_list[t],
                "flux": np.where(good, flux[t], 0.0).astype(float),
                "err": np.where(good, err[t], np.inf).astype(float),
                "good": good,
                "n_frames": 1,
            }
        ]
    keys = [wcs_key(w, (ny, nx)) for w in wcs_list]
    epochs = []
    for key in dict.fromkeys(keys[t] for t in range(nt) if tm[t]):
        idx = [t for t in range(nt) if tm[t] and keys[t] == key]
        s = np.zeros((ny, nx))
        v = np.zeros((ny, nx))
        n = np.zeros((ny, nx))
        for t in idx:  # a running sum: no (nframes, ny, nx) float64 copy
            good = np.isfinite(flux[t]) & np.isfinite(err[t]) & (err[t] > 0)
            if mask is not None:
                good &= ~mask[t]
            s += np.where(good, flux[t], 0.0)
            v += np.where(good, np.asarray(err[t], float) ** 2, 0.0)
            n += good
        good = n > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            epochs.append(
                {
                    "wcs": wcs_list[idx[0]],
                    "flux": np.where(good, s / np.maximum(n, 1), 0.0),
                    "err": np.where(good, np.sqrt(v) / np.maximum(n, 1), np.inf),
                    "good": good,
                    "n_frames": len(idx),
                }
            )
    # The epoch with the most frames is the reference (its WCS becomes the model's reference WCS).
    epochs.sort(key=lambda e: -e["n_frames"])
    return epochs


def check_sources(ra, dec, flux_estimate, source_ids, params):
    """The sources as arrays, checked: finite positions, one entry each, unique integer ids.

    Returns
    -------
    ra, dec, flux_estimate : numpy.ndarray
        float64.
    source_ids : numpy.ndarray
        int64 (``0..n-1`` when ``source_ids`` is None).

    Raises
    ------
    ValueError
        Naming what is wrong.
    """
    ra = np.atleast_1d(np.asarray(ra, dtype=float))
    dec = np.atleast_1d(np.asarray(dec, dtype=float))
    f0 = np.atleast_1d(np.asarray(flux_estimate, dtype=float))
    ns = ra.size
    if ns == 0:
        raise ValueError("no sources given")
    if dec.shape != ra.shape or f0.shape != ra.shape:
        raise ValueError(
            f"ra, dec and flux_estimate must have one entry per source ({ra.shape}, {dec.shape}, {f0.shape})"
        )
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        nbad = int(np.sum(~(np.isfinite(ra) & np.isfinite(dec))))
        raise ValueError(f"{nbad} source(s) have non-finite ra/dec")
    sids = np.arange(ns, dtype=np.int64) if source_ids is None else np.asarray(source_ids)
    if sids.shape != ra.shape:
        raise ValueError("source_ids must have one entry per source")
    if sids.dtype.kind not in "iu":
        raise ValueError(f"source_ids must be integers, got dtype {sids.dtype}")
    sids = sids.astype(np.int64)
    if np.unique(sids).size != ns:
        raise ValueError("source_ids are not unique")
    for name in ("prior_mu", "prior_sigma"):
        v = getattr(params, name)
        if v is not None and np.ndim(v) == 1 and np.size(v) != ns:
            raise ValueError(f"PRF parameter {name} has {np.size(v)} entries for {ns} sources")
    return ra, dec, f0, sids


def check_frames(params, nt: int) -> np.ndarray:
    """The frames of the shape model (``params.time_mask``, checked against ``nt`` frames and
    ``params.frame_index``), as a bool array.

    Raises
    ------
    ValueError
        Naming the parameter that does not fit the frames.
    """
    tm = np.ones(nt, bool) if params.time_mask is None else np.asarray(params.time_mask, bool)
    if tm.shape != (nt,):
        raise ValueError(f"PRF parameter time_mask has {tm.size} entries for {nt} frames")
    if params.frame_index != "mean":
        fi = int(params.frame_index)
        if not -nt <= fi < nt:
            raise ValueError(f"PRF parameter frame_index={fi} is out of range for {nt} frames")
        if not tm[fi]:
            raise ValueError(f"PRF parameter frame_index={fi} is excluded by time_mask")
    return tm


def check_catalog(catalog, params, catalog_path=None) -> None:
    """A catalog the PRF model can use: ``source_id``, ``ra``, ``dec`` and ``params.sources_flux_column``,
    and at least one row.

    Raises
    ------
    BadInputError
        Naming ``catalog_path`` and the missing columns (or that it is empty).
    """
    names = catalog.colnames if hasattr(catalog, "colnames") else list(catalog)
    need = ["source_id", "ra", "dec", params.sources_flux_column]
    missing = [c for c in need if c not in names]
    if missing:
        raise BadInputError(
            catalog_path,
            f"catalog lacks column(s) {missing} needed for PRF photometry "
            f"(sources_flux_column={params.sources_flux_column!r})",
        )
    if len(catalog["ra"]) == 0:
        raise BadInputError(catalog_path, "catalog is empty")
