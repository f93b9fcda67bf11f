"""The flux fit of a PRF model: every source's flux in every frame, exactly per frame (:mod:`.model`, step 5).

:func:`solve_batch` solves flattened frames on one solve plan (:class:`~.solver.SolvePlan`) and flags what
cannot be trusted; :func:`fit_frames` groups a batch of frames by WCS and returns a :class:`FitResult`;
:func:`solve_reference` is the prior-free fit of a reference image that the shape fit uses.
"""

from __future__ import annotations

import numpy as np

from .inputs import frame_stacks, gather_pixels, per_frame_wcs
from .solver import FLAG_LOW_COVERAGE, FLAG_SOLVE_FAILED, FitResult

__all__ = ["FrameOutputs", "fit_frames", "flux_prior_terms", "model_image", "solve_batch", "solve_reference"]


def fit_frames(
    model,
    flux,
    flux_err=None,
    mask=None,
    wcs=None,
    return_model=False,
    gain=1.0,
    rdnoise=0.0,
    prior_mu=None,
    prior_sigma=None,
) -> FitResult:
    """The work of :meth:`PRFModel.fit <photref_core.prf.model.PRFModel.fit>` (documented there) for
    ``model``; returns a :class:`~.solver.FitResult`."""
    flux, err, mask = frame_stacks(flux, flux_err, mask, gain, rdnoise)
    T, ny, nx = flux.shape
    wcs_list = per_frame_wcs(model.wcs if wcs is None else wcs, T)
    mu, isig2 = flux_prior_terms(model, prior_mu, prior_sigma)
    out = FrameOutputs(T, model.nsources, bool(model.params.fit_background))
    images = np.zeros((T, ny, nx)) if return_model else None
    # Frames sharing a WCS share a plan (keys computed once per distinct WCS object).
    by_id = {}
    keys = [by_id.setdefault(id(w), model.frames.entry(w, (ny, nx))["key"]) for w in wcs_list]
    flat_f, flat_e = flux.reshape(T, -1), err.reshape(T, -1)
    flat_m = None if mask is None else mask.reshape(T, -1)
    for key in dict.fromkeys(keys):
        idx = np.array([t for t, k in enumerate(keys) if k == key])
        w0 = wcs_list[idx[0]]
        plan = model.frames.plan(w0, (ny, nx))
        whole = idx.size == T  # every frame: views, no copy of the full frames
        F = flat_f if whole else flat_f[idx]
        E = flat_e if whole else flat_e[idx]
        M = None if flat_m is None else (flat_m if whole else flat_m[idx])
        solution = solve_batch(plan, F, E, M, mu, isig2, model.params)
        out.put(idx, solution)
        if return_model:
            images[idx] = model_image(plan, solution[6], solution[4]).reshape(idx.size, ny, nx)
    return out.result(model.source_ids, model=images)


def model_image(plan, weights, background=None) -> np.ndarray:
    """SPEC 6's model image of fitted frames: sum over sources of weight x normalised PRF (+ background).

    Parameters
    ----------
    plan : SolvePlan
        The frames' solve plan (their sources' mean model on the frame grid).
    weights : numpy.ndarray
        (T, nsources) source weights; NaN counts as 0.
    background : numpy.ndarray, optional
        (T,) constant background per frame.

    Returns
    -------
    numpy.ndarray
        (T, npix) flattened model frames.
    """
    weights = np.atleast_2d(weights)
    out = np.zeros((weights.shape[0], plan.npix))
    out[:, plan.pix_u] = (plan.Xc.T @ np.nan_to_num(weights).T).T
    if background is not None:
        out += np.nan_to_num(np.asarray(background, float))[:, None]
    return out


class FrameOutputs:
    """The per-frame outputs of a fit, filled frame batch by frame batch (:func:`solve_batch` results).

    Parameters
    ----------
    n_frames, n_sources : int
    fit_background : bool
    """

    def __init__(self, n_frames: int, n_sources: int, fit_background: bool):
        self.arrays = {
            k: np.full((n_frames, n_sources), np.nan) for k in ("flux", "flux_err", "good_fraction")
        }
        self.arrays["flag"] = np.zeros((n_frames, n_sources), np.int16)
        self.fit_background = fit_background
        for k in ("background", "background_err"):
            self.arrays[k] = np.full(n_frames, np.nan) if fit_background else None

    def put(self, idx, solution):
        """Store a :func:`solve_batch` result for the frames ``idx``."""
        a = self.arrays
        flux, err, flag, frac, bg, bg_err, _ = solution
        a["flux"][idx], a["flux_err"][idx], a["flag"][idx], a["good_fraction"][idx] = flux, err, flag, frac
        if self.fit_background:
            a["background"][idx], a["background_err"][idx] = bg, bg_err

    def result(self, source_ids, **extra) -> FitResult:
        """The :class:`~.solver.FitResult` (``extra``: its model image or transforms)."""
        return FitResult(source_id=np.asarray(source_ids).copy(), **self.arrays, **extra)


def flux_prior_terms(model, prior_mu=None, prior_sigma=None):
    """The flux prior of a fit as ``(mu, 1 / sigma^2)`` per source: the model's, or the overrides
    (scalars broadcast); ``mu`` must be finite and ``sigma`` > 0 (inf allowed)."""
    ns = model.nsources
    mu = np.broadcast_to(np.asarray(model.prior_mu if prior_mu is None else prior_mu, float), (ns,))
    sig = np.broadcast_to(np.asarray(model.prior_sigma if prior_sigma is None else prior_sigma, float), (ns,))
    if not (np.all(np.isfinite(mu)) and np.all(sig > 0)):
        raise ValueError("prior_mu must be finite and prior_sigma > 0")
    return mu, 1.0 / sig**2


def solve_batch(plan, F, E, M, mu, isig2, params, extra=None):
    """Solve flattened frames (T, npix) on one plan; returns flux, err, flag, frac, bg, bgerr, w.

    ``M`` is the (T, npix) bad-pixel mask or None; ``params`` gives ``fit_background`` and
    ``min_good_fraction``. Only the model pixels are touched unless a
    background is fitted (then every pixel enters the background sums). Everything is float64.
    ``extra``: more right-hand sides of a one-frame batch (:meth:`~.solver.SolvePlan.solve`), whose
    solutions are then returned as an eighth element.
    """
    fit_bg = bool(params.fit_background)
    Fu, Wu, goodu = gather_pixels(F, E, M, plan.pix_u)
    bg = None
    if fit_bg:
        s = np.zeros(F.shape[0])
        c = np.zeros(F.shape[0])
        for t in range(F.shape[0]):  # per frame: no (T, npix) float64 temporaries
            _, wt, _ = gather_pixels(F[t : t + 1], E[t : t + 1], None if M is None else M[t : t + 1], None)
            ft = np.where(wt[0] > 0, F[t], 0.0).astype(float)
            s[t], c[t] = wt.sum(), float(wt[0] @ ft)
        bg = (s, c)
    solved = plan.solve(Fu, Wu, mu, isig2, bg, extra)
    w, var, bgw, bgvar, failed = solved[:5]
    frac = (plan.Xc @ goodu.T.astype(float)).T
    flag = np.zeros(w.shape, np.int16)
    low = frac < params.min_good_fraction
    flag[low] |= FLAG_LOW_COVERAGE
    bad = failed | ~np.isfinite(w) | ~(var >= 0)
    flag[bad & ~low] |= FLAG_SOLVE_FAILED
    out = np.where(flag == 0, w, np.nan)
    out_err = np.where(flag == 0, np.sqrt(np.where(var >= 0, var, np.nan)), np.nan)
    bge = np.sqrt(bgvar) if bgvar is not None else None
    if extra is not None:
        return out, out_err, flag, frac, bgw, bge, w, solved[5]
    return out, out_err, flag, frac, bgw, bge, w


def solve_reference(model, epoch, raw=False):
    """Prior-free fit of a reference image (the mean frame): fluxes and errors (NaN where flagged;
    ``raw``: the solution of every source, flagged or not, and no errors)."""
    plan = model.frames.plan(epoch["wcs"])
    img = epoch["flux"].ravel()[None, :]
    err = epoch["err"].ravel()[None, :]
    bad = ~epoch["good"].ravel()[None, :]
    ns = model.nsources
    res = solve_batch(plan, img, err, bad, np.zeros(ns), np.zeros(ns), model.params)
    if raw:
        return res[6][0], None
    return res[0][0], res[1][0]
