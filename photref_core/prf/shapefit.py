"""The shape fit of a PRF model on its reference image(s): masks, weights, refinement, the flux prior.

Steps 2-3 of :mod:`.model`: the masks from flux estimates (never from the data), the weighted fit of
``log10(data / F)`` on uncontaminated pixels (:func:`~.shape.fit_shape_weights`), ``shape_iterations``
rounds with the fluxes fitted on the reference image, then the joint all-pixel refinement
(:mod:`.refine`) and the flux prior of the per-frame fit.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from .fluxfit import solve_reference
from .refine import JointPixels, refine_shape
from .shape import GN_STEPS, empirical_profile, fit_shape_weights, model_values

__all__ = ["fit_shape", "flux_prior"]


def fit_shape(model, epochs) -> None:
    """Fit ``model.shape`` on the reference image(s) ``epochs`` and set the model's masks, shape data,
    flux prior and diagnostics (steps 2-3 of :mod:`.model`).

    Parameters
    ----------
    model : PRFModel
        A model whose shape is still to fit; changed in place.
    epochs : list of dict
        The reference image(s) (:func:`~.inputs.reference_epochs`), the first the reference.
    """
    p = model.params
    sm = model.shape
    geoms = [model.frames.geometry(e["wcs"]) for e in epochs]
    ref_err = epochs[0]["err"][epochs[0]["good"]]
    if p.flux_cut_off is not None:
        cut = float(p.flux_cut_off)
    else:
        cut = 3.0 * float(np.median(ref_err)) if ref_err.size else 0.0
    model.diagnostics["flux_cut_off"] = cut
    model.diagnostics["crowded_fallback"] = False
    F = np.where(np.isfinite(model.flux_estimate) & (model.flux_estimate > 0), model.flux_estimate, np.nan)
    prof_r, prof_v = empirical_profile(geoms, epochs, F, p)
    model.diagnostics["empirical_profile"] = (prof_r, prof_v)
    # Prior on the shape weights: the empirical radial profile at each radial function's Greville point.
    grev = np.array([np.mean(sm.r_knots[j + 1 : j + 4]) for j in range(sm.n_radial)])
    lp = np.interp(grev, prof_r, np.log10(prof_v))
    w_prior = np.concatenate([lp[: sm.n_cut], np.repeat(lp[sm.n_cut :], sm.n_phi_knots)])
    mu_fit = err_fit = None
    for it in range(p.shape_iterations):
        data = []
        masks = []
        for ie, (e, g) in enumerate(zip(epochs, geoms, strict=True)):
            emp = F[g.src] * np.interp(g.r, prof_r, prof_v)
            if it == 0:
                est = emp
            else:
                mvals = model_values(sm, g)
                est = np.where(g.r <= sm.rmax, F[g.src] * mvals, emp)
            est = np.nan_to_num(est, nan=0.0)
            smask = est > cut
            count = np.bincount(g.pix[smask], minlength=g.npixels)
            unc = smask & (count[g.pix] == 1)
            masks.append((smask, unc))
            img, er, good = e["flux"].ravel(), e["err"].ravel(), e["good"].ravel()
            f = img[g.pix]
            # Selected on the masks (model estimates), never on the data: no selection bias.
            usable = (g.r <= sm.rmax) & good[g.pix] & (F[g.src] > 0)
            sel = unc & usable
            if p.crowded_dominance is not None and sel.sum() < 10 * sm.nbasis:
                # Crowded: too few uncontaminated pixels. Use the pixels the source dominates
                # (>= crowded_dominance of all sources' estimated flux there), with the other
                # sources' estimated flux subtracted.
                tot = np.bincount(g.pix, weights=est, minlength=g.npixels)[g.pix]
                sel = smask & usable & (est >= p.crowded_dominance * tot)
                f = f - (tot - est)
                model.diagnostics["crowded_fallback"] = True
            q = f[sel] / F[g.src[sel]]
            sq = er[g.pix[sel]] / F[g.src[sel]]
            star = g.src[sel] + ie * model.nsources  # one log-flux offset per (epoch, source)
            data.append((g.r[sel], g.phi[sel], q, sq, g.xi[sel], g.eta[sel], star))
        r, phi, q, sq, xi, eta, src = (np.concatenate(a) for a in zip(*data, strict=True))
        if np.sum(q > 0) < sm.nbasis:
            raise ValueError(
                f"only {np.sum(q > 0)} uncontaminated pixels to fit a shape model of "
                f"{sm.nbasis} weights: lower flux_cut_off, fewer knots, or more/brighter "
                "sources"
            )
        # The Gauss-Newton refinement only matters for the final shape (earlier ones only set masks).
        last = it == p.shape_iterations - 1
        # Small dense solves (nbasis^2): one BLAS thread (measured: a 167 x 167 Cholesky took 116 ms
        # under thread oversubscription, 0.15 ms on one thread).
        with threadpool_limits(limits=1, user_api="blas"):
            keep = fit_shape_weights(sm, r, phi, q, sq, src, w_prior, p, gn_steps=GN_STEPS if last else 0)
        sm.normalise()
        model.frames.drop_models()
        if last and p.refine_iterations:
            _refine(model, epochs, geoms, w_prior)
        # Fluxes on the reference image with this shape (prior-free): next shape fit's F, and the prior.
        mu_fit, err_fit = solve_reference(model, epochs[0])
        ok = np.isfinite(mu_fit) & (mu_fit > 0)
        if ok.any():
            ratio = np.nanmedian(mu_fit[ok] / np.where(F[ok] > 0, F[ok], np.nan))
            F = np.where(ok, mu_fit, F * (ratio if np.isfinite(ratio) else 1.0))
    g0 = geoms[0]
    smask, unc = masks[0]
    model.source_mask = g0.matrix(True, smask).astype(bool)
    model.uncontaminated_source_mask = g0.matrix(True, unc).astype(bool)
    n_keep = keep.sum()
    sub = np.flatnonzero(keep & (q > 0))
    if sub.size > 50_000:
        sub = np.sort(np.random.default_rng(0).choice(sub, 50_000, replace=False))
    model.shape_data = {
        "r": r[sub],
        "phi": phi[sub],
        "y": np.log10(q[sub]),
        "xi": xi[sub],
        "eta": eta[sub],
    }
    model.diagnostics.update(n_shape_points=int(q.size), n_shape_kept=int(n_keep))
    model.prior_mu, model.prior_sigma = flux_prior(p, mu_fit, err_fit, epochs[0]["n_frames"])
    model.diagnostics["reference_flux"] = mu_fit
    model.diagnostics["reference_flux_err"] = err_fit


def _refine(model, epochs, geoms, w_prior):
    """The joint all-pixel refinement of the shape on the reference image(s) (:mod:`.refine`)."""
    problems = [JointPixels(model.shape, g, e) for e, g in zip(epochs, geoms, strict=True)]

    def amplitudes():
        return [solve_reference(model, e, raw=True)[0] for e in epochs]

    model.diagnostics.update(
        refine_shape(
            model.shape, problems, amplitudes, w_prior, model.params, on_shape_change=model.frames.drop_models
        )
    )


def flux_prior(params, mu_fit, err_fit, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian flux prior of the per-frame fit (``prior_mu``, ``prior_sigma`` of :class:`PRFParameters`).

    Parameters
    ----------
    params : PRFParameters
    mu_fit, err_fit : numpy.ndarray
        Prior-free fluxes and errors fitted on the reference image (NaN where flagged).
    n_frames : int
        Frames averaged into the reference image (its errors are per-frame errors / sqrt(n)).

    Returns
    -------
    mu, sigma : numpy.ndarray
        Per source; ``mu`` finite.
    """
    p = params
    nref = n_frames
    if p.prior_mu is not None:
        mu = np.broadcast_to(np.asarray(p.prior_mu, float), mu_fit.shape).copy()
    else:
        mu = mu_fit.copy()
    if p.prior_sigma is not None:
        sig = np.broadcast_to(np.asarray(p.prior_sigma, float), mu_fit.shape).copy()
    else:
        e1 = np.nan_to_num(err_fit, nan=0.0) * np.sqrt(nref)
        sig = p.prior_sigma_factor * np.sqrt(np.nan_to_num(mu, nan=0.0) ** 2 + e1**2)
        fin = np.isfinite(mu)
        wide = p.prior_sigma_factor * (np.max(np.abs(mu[fin])) if fin.any() else 1.0)
        sig = np.where(fin & (sig > 0), sig, wide if wide > 0 else 1.0)
    mu = np.where(np.isfinite(mu), mu, 0.0)
    return mu, sig
