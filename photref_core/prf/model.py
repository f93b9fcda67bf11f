"""PRF photometry: one shape model for a field, then every source flux in every frame (SPEC 6).

This is the psfmachine ``Machine`` (Hedges et al. 2021, AJ 162, 107; RomanCuts parameter names and
defaults) done right, on numpy arrays. The lead wires it to files, the store and flows.

What it does
------------
1. **Geometry** (:func:`~photref_core.prf.geometry.build_geometry`). For every source, the frame pixels whose
   centres lie within ``sparse_dist_lim`` arcsec, with their offsets on the tangent plane at the source
   (gnomonic standard coordinates: ``xi ~ dra cos(dec)`` east, ``eta ~ ddec`` north, exact for any separation
   and pole-safe), ``r = hypot(xi, eta)`` (arcsec) and ``phi = arctan2(eta, xi)``. Stored as flat arrays of
   (source, pixel) pairs sorted by source -- i.e. the CSR layout of a sparse (nsources x npixels) matrix --
   and built vectorised (integer pixel offsets broadcast against all sources; chunks bound the memory, there
   is no Python loop over sources).
2. **Masks.** ``source_mask``: pixels where a source's estimated flux exceeds ``flux_cut_off`` (the radius
   grows with brightness). The first estimate is ``flux_estimate x`` an empirical radial profile (the
   inverse-variance weighted median of data/flux-estimate in radial bins); later ones use the fitted model
   (the empirical profile beyond ``rmax``). ``uncontaminated_source_mask``: pixels of one source's mask
   only. Pixels are selected on these estimates, never on the data (no selection bias).
3. **Shape model** (:class:`ShapeModel`). ``log10(data / F_source)`` on uncontaminated good pixels with
   ``r <= rmax`` is fitted by weighted linear least squares (weights from the flux errors,
   ``sigma_log = err / (data ln 10)``) with Gaussian priors on the weights and iterative robust clipping,
   then refined by Gauss-Newton steps in linear flux space (working data ``S + (f - m) / (m ln 10)``,
   weights from the model ``m``), which removes the bias of the logarithm of noisy wing pixels. A free
   log-flux offset per source, eliminated exactly, absorbs the error of each flux estimate. The basis is
   the product of a periodic cubic B-spline in ``phi`` (``n_phi_knots`` functions) and a clamped cubic
   B-spline in ``r`` on ``[0, rmax]`` with breakpoints uniform in ``sqrt(r)`` from ``rmin`` to ``rmax``;
   radial functions whose knots all lie inside ``cut_r`` carry no ``phi`` dependence (so the model is
   single-valued at the centre). Both bases come from ``scipy.interpolate.BSpline.design_matrix``. The
   masks and the shape fit are repeated ``shape_iterations`` times (the first masks use the catalog flux
   estimates, later ones the fluxes fitted on the reference image: the catalog flux only seeds).
   The last round's shape is then refined jointly on every good pixel within ``rmax`` of any source of
   the reference image(s), every source's light modelled at once (:mod:`.refine`): the selection above
   cannot be exact where no pixel is uncontaminated (undersampled or crowded fields).
4. **Normalisation** (the psfmachine fix). The PRF integrates to 1 over the disc ``r <= rmax`` with the
   ``r dr dphi`` Jacobian, in pixel-area units: ``mean_model[i, p] = 10**S(r, phi) * A_i / N`` with
   ``N = int_0^rmax int_0^2pi 10**S r dr dphi`` (arcsec^2, Gauss-Legendre x periodic trapezoid) and
   ``A_i`` the pixel area at the source (arcsec^2, from the local WCS Jacobian). A fitted flux is thus the
   source flux inside ``rmax``, and for an isolated star fully on the frame its ``mean_model`` row sums
   to ~1 (its encircled energy inside ``rmax``, up to pixelisation of the disc edge).
5. **Flux fit** (:meth:`PRFModel.fit`). For each frame ``t``:
   ``(X^T C_t^-1 X + diag(1/sigma^2)) w_t = X^T C_t^-1 f_t + mu/sigma^2``, ``X = mean_model^T``,
   ``C_t = diag(err_t^2)``, ``flux_err = sqrt(diag((X^T C_t^-1 X + diag(1/sigma^2))^-1))``. Sources that
   share no model pixel are independent: the overlap graph is split with
   ``scipy.sparse.csgraph.connected_components`` and each group's small dense system is solved for all
   frames of a batch at once (``numpy.linalg.inv`` over a (groups, frames) batch axis, groups of equal
   size together). The per-frame normal matrices come from ONE sparse product ``P @ W`` where
   ``P[(i, j), p] = X[p, i] X[p, j]``; no dense nsources x nsources matrix is ever formed. An optional
   constant background per frame (flat prior, all good pixels of the frame) couples every group; it is
   eliminated exactly with a Schur complement, so groups stay independent.

Decisions where SPEC 6 is silent are documented on :class:`PRFParameters` and :meth:`PRFModel.fit`.
No time model (psfmachine's perturbation model) is built: :meth:`PRFModel.get_psf_metrics` says so.

The pieces live in their own modules: :mod:`.parameters`, :mod:`.geometry`, :mod:`.shape`, :mod:`.solver`;
:mod:`.steps` runs them over the store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import sparse
from threadpoolctl import threadpool_limits

from ..errors import BadInputError
from ..ingest.readers import default_error
from .geometry import Geometry, build_geometry
from .parameters import PRFParameters
from .refine import JointPixels, refine_shape
from .shape import GN_STEPS, ShapeModel, empirical_profile, fit_shape_weights, model_matrix, model_values
from .solver import FLAG_LOW_COVERAGE, FLAG_SOLVE_FAILED, FitResult, SolvePlan, same_pattern

__all__ = [
    "PRFModel",
    "PSFMetrics",
]


_CACHE_SIZE = 8  # geometries / mean models / solve plans kept per model (one per distinct WCS)


_FORMAT_VERSION = 1


@dataclass(eq=False)
class PSFMetrics:
    """Diagnostics of the model (psfmachine's ``get_psf_metrics``).

    Attributes
    ----------
    source_psf_fraction : numpy.ndarray
        (nsources,) fraction of each source's model (its flux inside ``rmax``) that lands on the frame,
        integrated with sub-pixel sampling (1 for a star fully on the frame).
    perturbed_ratio_mean, perturbed_std : numpy.ndarray or None
        psfmachine derives these from its time (perturbation) model; this implementation builds no time
        model, so they are ``None``.
    """

    source_psf_fraction: np.ndarray
    perturbed_ratio_mean: np.ndarray | None = None
    perturbed_std: np.ndarray | None = None
    notes: dict = field(default_factory=dict)


def _wcs_key(wcs, shape) -> str:
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


def _as_stack(a, name, dtype=None):
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(
            f"{name} must be an image (ny, nx) or a stack (nframes, ny, nx), got shape {a.shape}"
        )
    return a


class PRFModel:
    """A fitted PRF shape model for a field and the machinery to solve fluxes in any frame.

    Build with :meth:`build` (or :meth:`from_catalog`), fit frames with :meth:`fit`; serialise with
    :meth:`to_arrays` / :meth:`from_arrays` (or :meth:`save` / :meth:`load`) so that parallel tasks can
    each load the model and fit their own batch of frames.

    Parameters
    ----------
    shape : ShapeModel
    params : PRFParameters
    ra, dec, flux_estimate : numpy.ndarray
        Sources (degrees, catalog flux estimate).
    source_ids : numpy.ndarray
        int64 ids.
    wcs : astropy.wcs.WCS
        Reference WCS (the one of the shape-model reference image).
    image_shape : tuple of int
        (ny, nx).
    prior_mu, prior_sigma : numpy.ndarray
        Flux prior per source used by :meth:`fit` (``prior_sigma`` may be inf).
    """

    def __init__(
        self, shape, params, ra, dec, flux_estimate, source_ids, wcs, image_shape, prior_mu, prior_sigma
    ):
        self.shape = shape
        self.params = params
        self.ra = np.asarray(ra, dtype=float)
        self.dec = np.asarray(dec, dtype=float)
        self.flux_estimate = np.asarray(flux_estimate, dtype=float)
        self.source_ids = np.asarray(source_ids, dtype=np.int64)
        self.wcs = wcs
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.prior_mu = np.asarray(prior_mu, dtype=float)
        self.prior_sigma = np.asarray(prior_sigma, dtype=float)
        self.source_mask = None
        self.uncontaminated_source_mask = None
        self.shape_data = None  # subsample of the last shape fit's data, for plots
        self.diagnostics = {}
        self._cache = {}
        self._keys = {}

    @property
    def nsources(self) -> int:
        """Number of sources."""
        return self.ra.size

    # -- geometry and mean model for any WCS -------------------------------------------------------------
    def _entry(self, wcs=None, shape=None):
        wcs = self.wcs if wcs is None else wcs
        shape = self.image_shape if shape is None else tuple(int(x) for x in shape)
        memo = self._keys.get((id(wcs), shape))
        if memo is None or memo[0] is not wcs:
            memo = (wcs, _wcs_key(wcs, shape))  # holds the object, so its id cannot be reused
            self._keys[(id(wcs), shape)] = memo
        key = memo[1]
        ent = self._cache.pop(key, None)
        if ent is None:
            ent = {"wcs": wcs, "shape": shape, "key": key}
        self._cache[key] = ent  # most recently used last
        if len(self._cache) > _CACHE_SIZE:  # per-frame WCS lists: evict the oldest, keep the reference
            ref = self._keys.get((id(self.wcs), self.image_shape))
            for k in list(self._cache):
                if len(self._cache) <= _CACHE_SIZE:
                    break
                if k != key and (ref is None or k != ref[1]):
                    del self._cache[k]
            if len(self._keys) > 4 * _CACHE_SIZE:
                self._keys = {k: v for k, v in self._keys.items() if v[1] in self._cache}
        return ent

    def geometry(self, wcs=None, shape=None) -> Geometry:
        """Geometry of the sources on a frame with ``wcs`` (default: the reference WCS); cached.

        Parameters
        ----------
        wcs : astropy.wcs.WCS, optional
        shape : tuple of int, optional

        Returns
        -------
        Geometry
        """
        ent = self._entry(wcs, shape)
        if "geom" not in ent:
            ent["geom"] = build_geometry(
                ent["wcs"], ent["shape"], self.ra, self.dec, self.params.sparse_dist_lim
            )
        return ent["geom"]

    def model_for(self, wcs=None, shape=None) -> sparse.csr_array:
        """The normalised mean model (nsources x npixels) on a frame with ``wcs``; cached.

        Parameters
        ----------
        wcs : astropy.wcs.WCS, optional
        shape : tuple of int, optional

        Returns
        -------
        scipy.sparse.csr_array
        """
        ent = self._entry(wcs, shape)
        if "model" not in ent:
            g = self.geometry(wcs, shape)
            ent["model"] = model_matrix(self.shape, g)
        return ent["model"]

    @property
    def mean_model(self) -> sparse.csr_array:
        """Normalised PRF of every source on the reference frame (nsources x npixels, CSR)."""
        return self.model_for()

    def _plan(self, wcs=None, shape=None) -> SolvePlan:
        ent = self._entry(wcs, shape)
        X = self.model_for(wcs, shape)
        plan = ent.get("plan")
        if plan is None or not same_pattern(plan, X):
            plan = ent["plan"] = SolvePlan(X)
            ent["plan_for"] = X
        elif ent.get("plan_for") is not X:  # the shape changed, the geometry did not: new values only
            plan.refresh(X)
            ent["plan_for"] = X
        return plan

    # -- build ------------------------------------------------------------------------------------------
    @classmethod
    def from_catalog(cls, flux, flux_err, wcs, catalog, params=None, mask=None, catalog_path=None):
        """:meth:`build` with sources from a catalog table (SPEC 1.2/1.3).

        Parameters
        ----------
        flux, flux_err, wcs, params, mask
            As in :meth:`build`.
        catalog : astropy.table.Table or mapping
            Columns ``source_id``, ``ra``, ``dec`` and ``params.sources_flux_column``.
        catalog_path : str, optional
            The catalog's file, named in errors.

        Returns
        -------
        PRFModel
        """
        params = PRFParameters() if params is None else params
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
        return cls.build(
            flux,
            flux_err,
            wcs,
            np.asarray(catalog["ra"]),
            np.asarray(catalog["dec"]),
            np.asarray(catalog[params.sources_flux_column]),
            source_ids=np.asarray(catalog["source_id"]),
            params=params,
            mask=mask,
        )

    @classmethod
    def build(
        cls,
        flux,
        flux_err,
        wcs,
        ra,
        dec,
        flux_estimate,
        source_ids=None,
        params=None,
        mask=None,
        gain=1.0,
        rdnoise=0.0,
    ):
        """Fit the shape model of a field on its frames (psfmachine's ``Machine`` + ``build_shape_model``).

        Parameters
        ----------
        flux : array_like
            (nframes, ny, nx) background-subtracted frames (or one (ny, nx) image), data units.
        flux_err : array_like or None
            Same shape; ``None``: :func:`default_error` with ``gain`` and ``rdnoise``.
        wcs : astropy.wcs.WCS or list of astropy.wcs.WCS
            One WCS for every frame, or one per frame.
        ra, dec : array_like
            Source positions (degrees); must be finite.
        flux_estimate : array_like
            Catalog flux estimate (data units) -- only seeds the masks and the first shape fit.
        source_ids : array_like, optional
            int64 ids (default 0..n-1).
        params : PRFParameters, optional
        mask : array_like of bool, optional
            Bad pixels (nonzero = bad), same shape as ``flux`` or one (ny, nx) mask for all frames.
        gain, rdnoise : float
            For the default error image.

        Returns
        -------
        PRFModel
        """
        params = PRFParameters() if params is None else params.validate()
        flux = _as_stack(flux, "flux")
        nt, ny, nx = flux.shape
        err = default_error(flux, gain, rdnoise) if flux_err is None else _as_stack(flux_err, "flux_err")
        if err.shape != flux.shape:
            raise ValueError(f"flux_err shape {err.shape} differs from flux shape {flux.shape}")
        mask = _mask_stack(mask, flux.shape)
        wcs_list = _wcs_list(wcs, nt)
        ra = np.atleast_1d(np.asarray(ra, dtype=float))
        dec = np.atleast_1d(np.asarray(dec, dtype=float))
        f0 = np.atleast_1d(np.asarray(flux_estimate, dtype=float))
        ns = ra.size
        if ns == 0:
            raise ValueError("no sources given")
        if dec.shape != ra.shape or f0.shape != ra.shape:
            raise ValueError(
                f"ra, dec and flux_estimate must have one entry per source ({ra.shape}, "
                f"{dec.shape}, {f0.shape})"
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
        tm = np.ones(nt, bool) if params.time_mask is None else np.asarray(params.time_mask, bool)
        if tm.shape != (nt,):
            raise ValueError(f"PRF parameter time_mask has {tm.size} entries for {nt} frames")
        if params.frame_index != "mean":
            fi = int(params.frame_index)
            if not -nt <= fi < nt:
                raise ValueError(f"PRF parameter frame_index={fi} is out of range for {nt} frames")
            if not tm[fi]:
                raise ValueError(f"PRF parameter frame_index={fi} is excluded by time_mask")

        epochs = _reference_epochs(flux, err, mask, wcs_list, tm, params.frame_index)
        ref_wcs = epochs[0]["wcs"]
        model = cls(
            ShapeModel(params.n_r_knots, params.n_phi_knots, params.rmin, params.rmax, params.cut_r),
            params,
            ra,
            dec,
            f0,
            sids,
            ref_wcs,
            (ny, nx),
            np.zeros(ns),
            np.full(ns, np.inf),
        )
        model._fit_shape(epochs)
        return model

    def _fit_shape(self, epochs):
        p = self.params
        sm = self.shape
        geoms = [self.geometry(e["wcs"]) for e in epochs]
        ref_err = epochs[0]["err"][epochs[0]["good"]]
        if p.flux_cut_off is not None:
            cut = float(p.flux_cut_off)
        else:
            cut = 3.0 * float(np.median(ref_err)) if ref_err.size else 0.0
        self.diagnostics["flux_cut_off"] = cut
        self.diagnostics["crowded_fallback"] = False
        F = np.where(np.isfinite(self.flux_estimate) & (self.flux_estimate > 0), self.flux_estimate, np.nan)
        prof_r, prof_v = empirical_profile(geoms, epochs, F, p)
        self.diagnostics["empirical_profile"] = (prof_r, prof_v)
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
                    self.diagnostics["crowded_fallback"] = True
                q = f[sel] / F[g.src[sel]]
                sq = er[g.pix[sel]] / F[g.src[sel]]
                star = g.src[sel] + ie * self.nsources  # one log-flux offset per (epoch, source)
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
            self._drop_models()
            if last and p.refine_iterations:
                self._refine_shape(epochs, geoms, w_prior)
            # Fluxes on the reference image with this shape (prior-free): next shape fit's F, and the prior.
            mu_fit, err_fit = self._solve_reference(epochs[0])
            ok = np.isfinite(mu_fit) & (mu_fit > 0)
            if ok.any():
                ratio = np.nanmedian(mu_fit[ok] / np.where(F[ok] > 0, F[ok], np.nan))
                F = np.where(ok, mu_fit, F * (ratio if np.isfinite(ratio) else 1.0))
        g0 = geoms[0]
        smask, unc = masks[0]
        self.source_mask = g0.matrix(True, smask).astype(bool)
        self.uncontaminated_source_mask = g0.matrix(True, unc).astype(bool)
        n_keep = keep.sum()
        sub = np.flatnonzero(keep & (q > 0))
        if sub.size > 50_000:
            sub = np.sort(np.random.default_rng(0).choice(sub, 50_000, replace=False))
        self.shape_data = {
            "r": r[sub],
            "phi": phi[sub],
            "y": np.log10(q[sub]),
            "xi": xi[sub],
            "eta": eta[sub],
        }
        self.diagnostics.update(n_shape_points=int(q.size), n_shape_kept=int(n_keep))
        # The flux prior.
        nref = epochs[0]["n_frames"]

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
        self.prior_mu, self.prior_sigma = mu, sig
        self.diagnostics["reference_flux"] = mu_fit
        self.diagnostics["reference_flux_err"] = err_fit

    def _drop_models(self):
        """Forget the model matrices after a change of the shape (geometry and plan structure stay)."""
        for ent in self._cache.values():
            ent.pop("model", None)

    def _refine_shape(self, epochs, geoms, w_prior):
        """The joint all-pixel refinement of the shape on the reference image(s) (:mod:`.refine`)."""
        problems = [JointPixels(self.shape, g, e) for e, g in zip(epochs, geoms, strict=True)]

        def amplitudes():
            return [self._solve_reference(e, raw=True)[0] for e in epochs]

        self.diagnostics.update(
            refine_shape(
                self.shape, problems, amplitudes, w_prior, self.params, on_shape_change=self._drop_models
            )
        )

    def _solve_reference(self, epoch, raw=False):
        """Prior-free fit of a reference image (the mean frame): fluxes and errors (NaN where flagged;
        ``raw``: the solution of every source, flagged or not, and no errors)."""
        plan = self._plan(epoch["wcs"])
        img = epoch["flux"].ravel()[None, :]
        err = epoch["err"].ravel()[None, :]
        bad = ~epoch["good"].ravel()[None, :]
        res = self._solve_batch(
            plan, img, err, bad, np.zeros(self.nsources), np.zeros(self.nsources), self.params.fit_background
        )
        if raw:
            return res[6][0], None
        return res[0][0], res[1][0]

    # -- fit --------------------------------------------------------------------------------------------
    def _solve_batch(self, plan, F, E, M, mu, isig2, fit_bg):
        """Solve flattened frames (T, npix) on one plan; returns flux, err, flag, frac, bg, bgerr, w.

        ``M`` is the (T, npix) bad-pixel mask or None. Only the model pixels are touched unless a
        background is fitted (then every pixel enters the background sums). Everything is float64.
        """
        Fu, Wu, goodu = _gather(F, E, M, plan.pix_u)
        bg = None
        if fit_bg:
            s = np.zeros(F.shape[0])
            c = np.zeros(F.shape[0])
            for t in range(F.shape[0]):  # per frame: no (T, npix) float64 temporaries
                _, wt, _ = _gather(F[t : t + 1], E[t : t + 1], None if M is None else M[t : t + 1], None)
                ft = np.where(wt[0] > 0, F[t], 0.0).astype(float)
                s[t], c[t] = wt.sum(), float(wt[0] @ ft)
            bg = (s, c)
        w, var, bgw, bgvar, failed = plan.solve(Fu, Wu, mu, isig2, bg)
        frac = (plan.Xc @ goodu.T.astype(float)).T
        flag = np.zeros(w.shape, np.int16)
        low = frac < self.params.min_good_fraction
        flag[low] |= FLAG_LOW_COVERAGE
        bad = failed | ~np.isfinite(w) | ~(var >= 0)
        flag[bad & ~low] |= FLAG_SOLVE_FAILED
        out = np.where(flag == 0, w, np.nan)
        out_err = np.where(flag == 0, np.sqrt(np.where(var >= 0, var, np.nan)), np.nan)
        bge = np.sqrt(bgvar) if bgvar is not None else None
        return out, out_err, flag, frac, bgw, bge, w

    def fit(
        self,
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
        """Fluxes of every source in every frame of a batch (psfmachine's ``fit_model``), exactly per frame.

        Each frame is solved on its own (results do not depend on how frames are batched):
        ``(X^T C^-1 X + diag(1/sigma^2)) w = X^T C^-1 f + mu/sigma^2`` with ``X`` the normalised mean model on
        the frame's WCS, per connected group of overlapping sources, all frames of the batch at once.
        Bad pixels (``mask``, non-finite flux or error, error <= 0) take part in no fit. The solution of a
        source with less than ``min_good_fraction`` of its model on good pixels is reported NaN with
        :data:`FLAG_LOW_COVERAGE` (it stays in its group's system, so its light is still modelled for its
        neighbours). With ``params.fit_background`` a constant background per frame is fitted (flat prior,
        from every good pixel of the frame) and eliminated exactly (Schur complement). The cost per frame
        grows with the sum over groups of (group size)^3: a field so crowded that every source overlaps
        into one component degenerates to psfmachine's dense solve (then solved a few frames at a time,
        in bounded memory).

        Parameters
        ----------
        flux : array_like
            (T, ny, nx) frames or one (ny, nx) image, data units, background-subtracted.
        flux_err : array_like, optional
            Same shape; ``None``: :func:`default_error` with ``gain``, ``rdnoise``.
        mask : array_like of bool, optional
            Bad pixels, (T, ny, nx) or (ny, nx).
        wcs : astropy.wcs.WCS or list of astropy.wcs.WCS, optional
            The frames' WCS (one, or one per frame); default: the reference WCS.
        return_model : bool
            Also return the (T, ny, nx) model image.
        gain, rdnoise : float
            For the default error image.
        prior_mu, prior_sigma : array_like, optional
            Override the stored prior (per source, scalars broadcast; ``prior_sigma`` may be inf).

        Returns
        -------
        FitResult
        """
        flux = _as_stack(flux, "flux")
        T, ny, nx = flux.shape
        err = default_error(flux, gain, rdnoise) if flux_err is None else _as_stack(flux_err, "flux_err")
        if err.shape != flux.shape:
            raise ValueError(f"flux_err shape {err.shape} differs from flux shape {flux.shape}")
        mask = _mask_stack(mask, flux.shape)
        wcs_list = _wcs_list(self.wcs if wcs is None else wcs, T)
        mu = np.broadcast_to(
            np.asarray(self.prior_mu if prior_mu is None else prior_mu, float), (self.nsources,)
        )
        sig = np.broadcast_to(
            np.asarray(self.prior_sigma if prior_sigma is None else prior_sigma, float), (self.nsources,)
        )
        if not (np.all(np.isfinite(mu)) and np.all(sig > 0)):
            raise ValueError("prior_mu must be finite and prior_sigma > 0")
        isig2 = 1.0 / sig**2
        ns = self.nsources
        out = {k: np.full((T, ns), np.nan) for k in ("flux", "flux_err", "frac")}
        flag = np.zeros((T, ns), np.int16)
        fit_bg = bool(self.params.fit_background)
        bgv = np.full(T, np.nan) if fit_bg else None
        bge = np.full(T, np.nan) if fit_bg else None
        model = np.zeros((T, ny, nx)) if return_model else None
        # Frames sharing a WCS share a plan (keys computed once per distinct WCS object).
        by_id = {}
        keys = [by_id.setdefault(id(w), self._entry(w, (ny, nx))["key"]) for w in wcs_list]
        flat_f, flat_e = flux.reshape(T, -1), err.reshape(T, -1)
        flat_m = None if mask is None else mask.reshape(T, -1)
        for key in dict.fromkeys(keys):
            idx = np.array([t for t, k in enumerate(keys) if k == key])
            w0 = wcs_list[idx[0]]
            plan = self._plan(w0, (ny, nx))
            whole = idx.size == T  # every frame: views, no copy of the full frames
            F = flat_f if whole else flat_f[idx]
            E = flat_e if whole else flat_e[idx]
            M = None if flat_m is None else (flat_m if whole else flat_m[idx])
            f, fe, fl, frac, b, be, wraw = self._solve_batch(plan, F, E, M, mu, isig2, fit_bg)
            out["flux"][idx], out["flux_err"][idx], out["frac"][idx], flag[idx] = f, fe, frac, fl
            if fit_bg:
                bgv[idx], bge[idx] = b, be
            if return_model:
                m = np.zeros((idx.size, ny * nx))
                m[:, plan.pix_u] = (plan.Xc.T @ np.nan_to_num(wraw).T).T
                if fit_bg:
                    m += b[:, None]
                model[idx] = m.reshape(idx.size, ny, nx)
        return FitResult(
            flux=out["flux"],
            flux_err=out["flux_err"],
            flag=flag,
            good_fraction=out["frac"],
            source_id=self.source_ids.copy(),
            background=bgv,
            background_err=bge,
            model=model,
        )

    # -- diagnostics ------------------------------------------------------------------------------------
    def get_psf_metrics(self, wcs=None, shape=None) -> PSFMetrics:
        """Model diagnostics (psfmachine's ``get_psf_metrics``).

        ``source_psf_fraction``: the fraction of each source's model flux (its flux inside ``rmax``) that
        lands on the frame's pixels: ``sum_p PRF(offset_p) * a_p`` over the frame pixels, where ``a_p`` is
        the fraction of pixel ``p`` inside the disc ``r <= rmax``, from ``psf_subsample`` x ``psf_subsample``
        sub-pixel samples (tangent-plane offsets from the local WCS Jacobian). The sub-pixel sampling
        removes the pixelisation of the disc edge that a plain row sum of ``mean_model`` (pixel centres
        inside the disc) has, so a star fully on the frame gets 1 to ~1e-4; the PRF itself is already
        pixel-integrated, so it is not sub-sampled again (that would blur the frame edge by a pixel). No
        time model is built, so ``perturbed_ratio_mean`` and ``perturbed_std`` are ``None``.

        Parameters
        ----------
        wcs : astropy.wcs.WCS, optional
            Frame WCS (default: the reference WCS).
        shape : tuple of int, optional

        Returns
        -------
        PSFMetrics
        """
        g = self.geometry(wcs, shape)
        sm = self.shape
        n = self.params.psf_subsample
        s = (np.arange(n) + 0.5) / n - 0.5
        sy, sx = np.meshgrid(s, s, indexing="ij")
        sx, sy = sx.ravel(), sy.ravel()
        half_diag = np.sqrt(np.sum(g.jac**2, axis=(1, 2)) / 2)  # arcsec, half the pixel diagonal (approx.)
        near = g.r <= sm.rmax + 1.01 * half_diag[g.src]
        src = g.src[near]
        J = g.jac[src]
        inside = np.zeros(src.size)
        for k in range(sx.size):  # n^2 sub-pixel offsets, each vectorised over all pairs
            xi = g.xi[near] + J[:, 0, 0] * sx[k] + J[:, 0, 1] * sy[k]
            eta = g.eta[near] + J[:, 1, 0] * sx[k] + J[:, 1, 1] * sy[k]
            inside += np.hypot(xi, eta) <= sm.rmax
        inside /= sx.size
        # PRF at the pixel centre; centres just beyond rmax (pixels straddling the edge) use r = rmax.
        val = 10.0 ** sm.log_value(np.minimum(g.r[near], sm.rmax), g.phi[near]) / sm.norm * g.area[src]
        frac = np.bincount(src, weights=val * inside, minlength=self.nsources)
        return PSFMetrics(source_psf_fraction=frac, notes={"time_model": "none: perturbed_* not computed"})

    def plot_shape_model(self, path, dpi=110):
        """Write a PNG of the shape-fit data, the model and their difference, in (r, phi) and on the sky
        (:func:`photref_core.prf.plots.plot_shape_model`); returns the path written."""
        from .plots import plot_shape_model

        return plot_shape_model(self, path, dpi=dpi)

    # -- serialisation ----------------------------------------------------------------------------------
    def to_arrays(self) -> dict:
        """Everything needed to fit frames elsewhere, as a dict of numpy arrays (``np.savez`` ready).

        Holds the parameters (JSON), the shape weights and normalisation, the sources, the prior, the
        reference WCS (header text), the reference ``mean_model`` (CSR arrays) and the masks.

        Returns
        -------
        dict of numpy.ndarray
        """
        mm = self.mean_model
        out = {
            "format_version": np.array(_FORMAT_VERSION),
            "params_json": np.array(json.dumps(self.params.to_dict())),
            "shape_weights": self.shape.weights,
            "shape_norm": np.array(self.shape.norm),
            "ra": self.ra,
            "dec": self.dec,
            "flux_estimate": self.flux_estimate,
            "source_id": self.source_ids,
            "prior_mu": self.prior_mu,
            "prior_sigma": self.prior_sigma,
            "wcs_header": np.array(self.wcs.to_header_string(relax=True)),
            "image_shape": np.array(self.image_shape, dtype=np.int64),
            "mean_model_data": mm.data,
            "mean_model_indices": mm.indices.astype(np.int64),
            "mean_model_indptr": mm.indptr.astype(np.int64),
        }
        for name in ("source_mask", "uncontaminated_source_mask"):
            m = getattr(self, name)
            if m is not None:
                out[f"{name}_indices"] = m.indices.astype(np.int64)
                out[f"{name}_indptr"] = m.indptr.astype(np.int64)
        if self.shape_data is not None:
            for k, v in self.shape_data.items():
                out[f"shape_data_{k}"] = v
        return out

    @classmethod
    def from_arrays(cls, arrays) -> PRFModel:
        """Rebuild a model from :meth:`to_arrays` output (no refit; the mean model is reused as stored).

        Parameters
        ----------
        arrays : mapping of numpy.ndarray
            E.g. an ``np.load`` result.

        Returns
        -------
        PRFModel
        """
        a = {k: np.asarray(arrays[k]) for k in arrays}
        if int(a.get("format_version", -1)) != _FORMAT_VERSION:
            raise ValueError(f"PRF model format version {a.get('format_version')} is not {_FORMAT_VERSION}")
        params = PRFParameters.from_dict(json.loads(str(a["params_json"])))
        sm = ShapeModel(params.n_r_knots, params.n_phi_knots, params.rmin, params.rmax, params.cut_r)
        sm.weights = a["shape_weights"].astype(float)
        sm.norm = float(a["shape_norm"])
        wcs = WCS(fits.Header.fromstring(str(a["wcs_header"])))
        shape = tuple(int(s) for s in a["image_shape"])
        m = cls(
            sm,
            params,
            a["ra"],
            a["dec"],
            a["flux_estimate"],
            a["source_id"],
            wcs,
            shape,
            a["prior_mu"],
            a["prior_sigma"],
        )
        ns, npix = m.nsources, shape[0] * shape[1]
        mm = sparse.csr_array(
            (a["mean_model_data"], a["mean_model_indices"], a["mean_model_indptr"]), shape=(ns, npix)
        )
        m._entry()["model"] = mm
        for name in ("source_mask", "uncontaminated_source_mask"):
            if f"{name}_indices" in a:
                idx = a[f"{name}_indices"]
                setattr(
                    m,
                    name,
                    sparse.csr_array((np.ones(idx.size, bool), idx, a[f"{name}_indptr"]), shape=(ns, npix)),
                )
        if "shape_data_r" in a:
            m.shape_data = {k: a[f"shape_data_{k}"] for k in ("r", "phi", "y", "xi", "eta")}
        return m

    def save(self, path):
        """Save :meth:`to_arrays` to a ``.npz`` file (no pickles).

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        str
        """
        path = os.fspath(path)
        np.savez_compressed(path, **self.to_arrays())
        return path if path.endswith(".npz") else path + ".npz"

    @classmethod
    def load(cls, path) -> PRFModel:
        """Load a model written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        PRFModel
        """
        try:
            with np.load(os.fspath(path), allow_pickle=False) as z:
                return cls.from_arrays({k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError) as exc:
            raise BadInputError(path, f"not a readable PRF model file ({exc})") from exc


def _gather(F, E, M, pix):
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


def _mask_stack(mask, shape):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 2:
        m = np.broadcast_to(m, shape)
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} does not match the frames {shape}")
    return m != 0


def _wcs_list(wcs, nt):
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


def _reference_epochs(flux, err, mask, wcs_list, tm, frame_index):
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
    keys = [_wcs_key(w, (ny, nx)) for w in wcs_list]
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
