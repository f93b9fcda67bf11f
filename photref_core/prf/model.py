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
6. **Time model, part 1** (``params.time_model``, :mod:`.timemodel`): per frame a geometric transform of
   the source positions (drift, plate scale) fitted with the fluxes, and a shape rebuilt and re-centred at
   the fitted positions. Part 2 (``params.perturbation``, :mod:`.perturbation`): psfmachine's perturbation
   model of PRF shape changes (focus), a factor per source offset and time applied after the transform.

:class:`PRFModel` is the face; the work lives in modules cut along its jobs: :mod:`.parameters`,
:mod:`.inputs` (checks, reference images), :mod:`.geometry`, :mod:`.cache` (geometry, mean model and solve
plan per frame WCS), :mod:`.shape` (the basis), :mod:`.shapefit` (steps 2-3), :mod:`.refine`,
:mod:`.solver` and :mod:`.fluxfit` (step 5), :mod:`.metrics`, :mod:`.serialise`; :mod:`.steps` runs them
over the store.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .cache import FrameModels
from .fluxfit import fit_frames
from .geometry import Geometry
from .inputs import (
    check_catalog,
    check_frames,
    check_sources,
    frame_stacks,
    per_frame_wcs,
    reference_epochs,
)
from .metrics import PSFMetrics, psf_metrics
from .parameters import PRFParameters
from .serialise import load_model, model_from_arrays, model_to_arrays, save_model
from .shape import ShapeModel
from .shapefit import fit_shape
from .solver import FitResult
from .timemodel import build_time_model, fit_frames_with_transform

__all__ = ["PRFModel"]


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
        self.time_model = None  # a TimeModel (:mod:`.timemodel`) when params.time_model
        self.diagnostics = {}
        self.frames = FrameModels(
            self.shape, self.ra, self.dec, params.sparse_dist_lim, wcs, self.image_shape
        )

    @property
    def nsources(self) -> int:
        """Number of sources."""
        return self.ra.size

    # -- geometry and mean model for any WCS (:mod:`.cache`) ---------------------------------------------
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
        return self.frames.geometry(wcs, shape)

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
        return self.frames.model_for(wcs, shape)

    @property
    def mean_model(self) -> sparse.csr_array:
        """Normalised PRF of every source on the reference frame (nsources x npixels, CSR)."""
        return self.frames.model_for()

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
        check_catalog(catalog, params, catalog_path)
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
        times=None,
    ):
        """Fit the shape model of a field on its frames (psfmachine's ``Machine`` + ``build_shape_model``).

        With ``params.time_model`` the time model is built too (:mod:`.timemodel`): the build frames'
        transforms and a shape rebuilt and re-centred at them, kept beside the static shape.

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
        times : array_like, optional
            (nframes,) frame times (e.g. JD): where the time model's fits of later frames start from.

        Returns
        -------
        PRFModel
        """
        params = PRFParameters() if params is None else params.validate()
        flux, err, mask = frame_stacks(flux, flux_err, mask, gain, rdnoise)
        nt, ny, nx = flux.shape
        wcs_list = per_frame_wcs(wcs, nt)
        ra, dec, f0, sids = check_sources(ra, dec, flux_estimate, source_ids, params)
        tm = check_frames(params, nt)
        epochs = reference_epochs(flux, err, mask, wcs_list, tm, params.frame_index)
        ns = ra.size
        model = cls(
            ShapeModel(params.n_r_knots, params.n_phi_knots, params.rmin, params.rmax, params.cut_r),
            params,
            ra,
            dec,
            f0,
            sids,
            epochs[0]["wcs"],
            (ny, nx),
            np.zeros(ns),
            np.full(ns, np.inf),
        )
        fit_shape(model, epochs)
        if params.time_model:
            model.time_model = build_time_model(
                model, flux, err, mask, wcs_list, tm, times, model.diagnostics["shape_prior_mean"]
            )
        return model

    # -- fit (:mod:`.fluxfit`) ----------------------------------------------------------------------------
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
        times=None,
        time_model=None,
    ) -> FitResult:
        """Fluxes of every source in every frame of a batch (psfmachine's ``fit_model``), exactly per frame.

        With the time model (:mod:`.timemodel`; by default whenever the model has one) each frame's
        geometric transform is fitted with its fluxes, frames in the order given, each starting from the
        previous frame's transform (the first from the build frames' transforms at its time), with the
        re-centred shape; the result's ``transform`` holds them; with the time model's perturbation
        (:mod:`.perturbation`) the shape is multiplied by it at each frame's time, so ``times`` are needed.
        ``time_model=False``: the static fit.

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
        times : array_like, optional
            (T,) frame times, for the time model's starting transform.
        time_model : bool, optional
            Use the time model (default: when the model has one). ``True`` without one is an error.

        Returns
        -------
        FitResult
        """
        use_time = self.time_model is not None if time_model is None else bool(time_model)
        if use_time:
            if self.time_model is None:
                raise ValueError("this PRF model has no time model (build it with params.time_model=True)")
            return fit_frames_with_transform(
                self, flux, flux_err, mask, wcs, times, return_model, gain, rdnoise, prior_mu, prior_sigma
            )
        return fit_frames(self, flux, flux_err, mask, wcs, return_model, gain, rdnoise, prior_mu, prior_sigma)

    # -- diagnostics (:mod:`.metrics`, :mod:`.plots`) -------------------------------------------------------
    def get_psf_metrics(self, wcs=None, shape=None, npoints_per_pixel=None, times=None) -> PSFMetrics:
        """Model diagnostics (psfmachine's ``get_psf_metrics``).

        ``source_psf_fraction``: the fraction of each source's model flux (its flux inside ``rmax``) that
        lands on the frame's pixels: ``sum_p PRF(offset_p) * a_p`` over the frame pixels, where ``a_p`` is
        the fraction of pixel ``p`` inside the disc ``r <= rmax``, from ``psf_subsample`` x ``psf_subsample``
        sub-pixel samples (tangent-plane offsets from the local WCS Jacobian). The sub-pixel sampling
        removes the pixelisation of the disc edge that a plain row sum of ``mean_model`` (pixel centres
        inside the disc) has, so a star fully on the frame gets 1 to ~1e-4; the PRF itself is already
        pixel-integrated, so it is not sub-sampled again (that would blur the frame edge by a pixel).

        With a time model, ``perturbed_ratio_mean`` and ``perturbed_std``: the time mean and standard
        deviation of ``sum_p mean_model_ip P_ip(t) / sum_p mean_model_ip`` (the perturbation's change of the
        source's modelled light, :func:`~.metrics.perturbed_ratios`; the time model's shape at its median
        transform), over ``times`` (default: the perturbation's time bins); 1 and 0 without a perturbation.
        ``None`` without a time model.

        Parameters
        ----------
        wcs : astropy.wcs.WCS, optional
            Frame WCS (default: the reference WCS).
        shape : tuple of int, optional
        npoints_per_pixel : int, optional
            Sub-pixel samples per axis (psfmachine's name; default ``params.psf_subsample``).
        times : array_like, optional
            Times of the perturbed metrics.

        Returns
        -------
        PSFMetrics
        """
        return psf_metrics(self, wcs, shape, npoints_per_pixel, times)

    def plot_shape_model(self, path, dpi=110):
        """Write a PNG of the shape-fit data, the model and their difference, in (r, phi) and on the sky
        (:func:`photref_core.prf.plots.plot_shape_model`); returns the path written."""
        from .plots import plot_shape_model

        return plot_shape_model(self, path, dpi=dpi)

    # -- serialisation (:mod:`.serialise`) ------------------------------------------------------------------
    def to_arrays(self) -> dict:
        """Everything needed to fit frames elsewhere, as a dict of numpy arrays (``np.savez`` ready).

        Holds the parameters (JSON), the shape weights and normalisation, the sources, the prior, the
        reference WCS (header text), the reference ``mean_model`` (CSR arrays) and the masks.

        Returns
        -------
        dict of numpy.ndarray
        """
        return model_to_arrays(self)

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
        return model_from_arrays(cls, arrays)

    def save(self, path):
        """Save :meth:`to_arrays` to a ``.npz`` file (no pickles).

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        str
        """
        return save_model(self, path)

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
        return load_model(cls, path)
