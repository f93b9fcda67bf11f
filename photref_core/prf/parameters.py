"""The PRF model's parameters (SPEC 6, the RomanCuts ``Machine`` names and defaults)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "KERNEL_THREADS",
    "PRF_DEFAULTS",
    "PSF_ZERO_POINT",
    "PRFParameters",
    "TRANSFORM_TERMS",
]

PSF_ZERO_POINT = 25.0
"""Default zero point of the PSF magnitudes added to the store (``mag = ZP - 2.5 log10 flux``)."""

KERNEL_THREADS = max(1, min(2, os.cpu_count() or 1))
"""Python threads of the PRF kernels that split their work in parts (the refinement's normal equations);
each part is computed alone and the parts are joined in a fixed order, so results do not depend on timing.
Two: 1.3x on 2 cores; much of the work holds the GIL, so more would add little."""


#: The time model's transforms (``transform``) and their terms, in pixels: ``dx``, ``dy`` the common shift;
#: ``scale`` the isotropic change (pixels at a half-width from the frame centre); ``dxdu`` ... the affine
#: terms (``d shift_x / d u`` ..., ``u``, ``v`` the position from the centre in half-widths).
TRANSFORM_TERMS = {
    "shift": ("dx", "dy"),
    "scale": ("dx", "dy", "scale"),
    "affine": ("dx", "dy", "dxdu", "dxdv", "dydu", "dydv"),
}


@dataclass(eq=False)
class PRFParameters:
    """Parameters of the PRF model, with the RomanCuts ``Machine`` names and defaults (0.11"/pix).

    Every radius is in ARCSEC on the sky, so a Kepler/TESS-scale field (4"/pix, 21"/pix) is fitted by
    passing radii scaled to its pixels.

    Parameters
    ----------
    n_r_knots : int
        Radial breakpoints (uniform in sqrt(r) from ``rmin`` to ``rmax``); the radial basis has
        ``n_r_knots + 3`` cubic B-splines on ``[0, rmax]``. At least 2.
    n_phi_knots : int
        Periodic cubic B-splines in the position angle. At least 4.
    rmin, rmax : float
        First and last radial breakpoint (arcsec), ``0 < rmin < rmax``. The model is zero beyond ``rmax``.
    cut_r : float
        Radial basis functions whose knots all lie within ``cut_r`` (arcsec) have no phi dependence.
        ``0 <= cut_r < rmax``.
    sparse_dist_lim : float
        Radius (arcsec) of the per-source pixel neighbourhood (geometry and masks); ``>= rmax``.
    sources_flux_column : str
        Catalog column with the flux estimate (:meth:`PRFModel.from_catalog`).
    time_mask : array_like of bool, optional
        Frames used for the shape model (``None``: all).
    flux_cut_off : float, optional
        Data units. A pixel is in a source's ``source_mask`` where the source's estimated flux there exceeds
        it. ``None`` (default): 3 x the median pixel error of the reference image, i.e. "detected at 3 sigma"
        whatever the data units (psfmachine's fixed default of 1 only suits e-/s data).
    frame_index : 'mean' or int
        Reference image for the shape model: the mean of the ``time_mask`` frames (per distinct WCS) or
        one frame.
    bin_data : bool or int
        ``False``/``0``/``None``: fit every pixel. An integer ``n >= 4``: form the shape fit's normal
        equations on the data averaged (inverse-variance weighted) in ``n`` radial bins uniform in sqrt(r)
        on ``[0, rmax]`` x ``n`` angular bins, each bin one point at its weighted mean (r, phi); the
        per-source offsets are then alternated with the shape instead of eliminated, and clipping still
        acts on individual pixels. ``True``: ``n = 4 * max(n_r_knots, n_phi_knots)``. For very large
        fields; costs some accuracy in the core, where the profile varies within a bin.
    prior_mu, prior_sigma : float or array_like, optional
        Gaussian prior of the flux fit, per source (scalars broadcast; ``prior_sigma`` may be ``inf``).
        Default ``prior_mu``: the fluxes of a prior-free fit on the reference image. Default
        ``prior_sigma``: ``prior_sigma_factor * sqrt(mu^2 + e^2)``, ``e`` the single-frame-equivalent
        error of that fit (so a faint star with mu ~ 0 is not pinned to 0); a source whose mu is not finite
        gets mu = 0 and ``prior_sigma_factor`` x the largest finite |mu|.
    prior_sigma_factor : float
        See ``prior_sigma`` (default 10: the prior shifts a star's flux by < 1 % of its error).
    shape_prior_sigma : float
        Width (dex) of the Gaussian prior on every shape weight, centred on the empirical radial profile;
        it only matters where the data do not constrain the shape.
    shape_phi_smooth : float or None
        Width (dex) of a Gaussian prior on the difference of neighbouring angular weights of each radial
        function (a roughness penalty: it damps angular noise in the faint wing, where few pixels
        constrain 15 angular copies; the data override it in the core). ``None``: no such prior.
    clip_sigma : float
        Shape-fit clipping: pixels whose normalised residual (in log space for the first fit, in flux in
        the Gauss-Newton steps) is further than ``clip_sigma`` robust standard deviations (1.4826 x MAD)
        from the median are dropped.
    clip_iterations : int
        Maximum number of clipping passes (0: none).
    shape_iterations : int
        Rounds of masks + shape fit; each after the first builds its masks from the previous model and
        the fluxes it fitted on the reference image. The Gauss-Newton refinement runs in the last.
    crowded_dominance : float or None
        Crowded fields: when fewer than 10 x (number of shape weights) uncontaminated pixels are usable,
        the shape is fitted instead on the pixels where a source's estimated flux is at least this
        fraction of all sources' estimated flux, after subtracting the others' estimates (the estimates
        improve with ``shape_iterations``; use 3-4 there). ``None``: never (SPEC's strict rule; too few
        pixels is then an error).
    refine_iterations : int
        Most iterations of the joint all-pixel refinement of the shape (:mod:`photref_core.prf.refine`):
        every good pixel within ``rmax`` of any source, every source's light modelled at once, (Gauss-)
        Newton steps with the source amplitudes profiled out. 0: off (the selection-based fit alone,
        biased by 1-3 % on undersampled fields, 0.8 % at 0.11"/pix: README, "PRF accuracy").
    refine_tol : float
        The refinement has converged when no shape weight changed by more than this (dex) in an iteration.
    refine_max_step : float
        Largest change of any shape weight in one refinement step (dex); longer steps are scaled down
        (undamped, the refinement diverged on an undersampled field; 0.3 was too slow to converge).
    refine_huber : float or None
        The refinement's robust weight: pixels whose normalised residual ``(data - model) / err`` is
        beyond this many robust standard deviations get Huber weights (outliers: cosmic rays, unmasked
        bad pixels). Generous on purpose: where the model is not flexible enough (a PRF core within one
        pixel) the brightest cores misfit by several sigma, and down-weighting them biases the bright
        stars (measured on a 21"/pix field with 10 radial knots, by an earlier alternating version of
        the refinement: 4 sigma gave chi std 1.155 and a 4-sigma bias of the brightest star, 10 gave
        1.135). ``None``: no robust weight.
    fit_background : bool
        Fit a constant background per frame (flat prior) together with the fluxes.
    min_good_fraction : float
        A source with less than this fraction of its model on good pixels of a frame gets NaN flux and
        :data:`FLAG_LOW_COVERAGE` (SPEC: half).
    psf_subsample : int
        Sub-pixel samples per axis for :meth:`PRFModel.get_psf_metrics`.
    time_model : bool
        Build the time model, part 1 (:mod:`photref_core.prf.timemodel`): per frame a geometric transform
        of the source positions (drift, plate scale) fitted with the fluxes, and a shape rebuilt and
        re-centred at the fitted positions. Off by default (SPEC 6).
    transform : str
        The time model's transform: ``shift`` (2 terms: a common shift), ``scale`` (3: shift and an
        isotropic plate-scale change) or ``affine`` (6). A shift alone cannot follow a plate-scale change.
    time_rounds : int
        Re-centring rounds of the time model's shape at build time (3 sufficed in the measured recipe).
    time_build_frames : int
        Most frames (of ``time_mask``, evenly spread) the time model's shape is rebuilt on; bounds its
        build time (every 2nd and every 4th frame of 40 measured the same).
    time_iterations : int
        Most Gauss-Newton steps of a frame's transform (each with a flux solve); it stops earlier once a
        step would move no source by more than 5e-4 pixel (keeping the fluxes solved before that step).
    time_core_radius : float or None
        Radius (arcsec) of the pixels around each source whose position derivatives fit the transform
        (the core carries the position information). ``None``: 0.3 x ``rmax`` (5.5 pixels at the SPEC
        radii's sampling).
    time_max_shift : float
        Pixels. The time model's pixel set per source is every pixel within ``rmax`` plus at least this
        many pixels (and within ``sparse_dist_lim``), fixed for all frames (so the solve's pattern stays);
        one linearised step moves a source by at most half of it. A drift not in the WCS larger than this
        is cut at the disc edge.
    perturbation : bool
        Build the time model, part 2 (:mod:`photref_core.prf.perturbation`, needs ``time_model``): a
        multiplicative perturbation of the PRF per pixel offset and time for shape changes (focus) that no
        transform of the positions follows; the time-model fluxes are then solved with it.
    time_nknots : int
        Breakpoints per axis of the perturbation's Cartesian B-splines, uniform in sqrt(|offset|) over the box
        of ``time_radius``. psfmachine's 10 sit on its 8" box (2 Kepler pixels); on this box (rmax / 2) 14
        resolve the core (measured on a Kepler-like field with a 10 % focus change: scatter 1.10x -> 1.05x
        the oracle's, chi std 1.28 -> 1.13; 18 no better).
    time_resolution : int
        Frames a time bin of the perturbation's fit (psfmachine's default 200); with fewer frames the bins
        shrink so each segment keeps at least 12 bins, down to one frame a bin.
    time_radius : float or None
        Half-width (arcsec) of the box of source offsets the perturbation is fitted on; beyond it the
        perturbation is continued as a constant. ``None``: ``rmax / 2``.
    """

    n_r_knots: int = 10
    n_phi_knots: int = 15
    rmin: float = 0.1
    rmax: float = 2.0
    cut_r: float = 0.2
    sparse_dist_lim: float = 4.0
    sources_flux_column: str = "flux"
    time_mask: list[bool] | np.ndarray | None = None
    flux_cut_off: float | None = None
    frame_index: str | int = "mean"
    bin_data: bool | int | None = False
    prior_mu: float | list[float] | np.ndarray | None = None
    prior_sigma: float | list[float] | np.ndarray | None = None
    prior_sigma_factor: float = 10.0
    shape_prior_sigma: float = 1.0
    shape_phi_smooth: float | None = 0.1
    clip_sigma: float = 4.0
    clip_iterations: int = 3
    shape_iterations: int = 2
    crowded_dominance: float | None = 0.8
    refine_iterations: int = 30
    refine_tol: float = 1e-3
    refine_max_step: float = 1.0
    refine_huber: float | None = 10.0
    fit_background: bool = False
    min_good_fraction: float = 0.5
    psf_subsample: int = 5
    time_model: bool = False
    transform: str = "affine"
    time_rounds: int = 3
    time_build_frames: int = 10
    time_iterations: int = 3
    time_core_radius: float | None = None
    time_max_shift: float = 2.0
    perturbation: bool = False
    time_nknots: int = 14
    time_resolution: int = 200
    time_radius: float | None = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Check every parameter; raise ``ValueError`` naming the first bad one.

        Returns
        -------
        PRFParameters
            ``self``, for chaining.
        """

        def is_int(v):
            return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)

        def is_num(v):
            num = isinstance(v, int | float | np.integer | np.floating)
            return num and not isinstance(v, bool | np.bool_)

        for name, lo in (
            ("n_r_knots", 2),
            ("n_phi_knots", 4),
            ("shape_iterations", 1),
            ("clip_iterations", 0),
            ("psf_subsample", 1),
            ("refine_iterations", 0),
            ("time_rounds", 0),
            ("time_build_frames", 1),
            ("time_iterations", 1),
            ("time_nknots", 2),
            ("time_resolution", 1),
        ):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"PRF parameter {name} must be an integer >= {lo}, got {v!r}")
        for name in (
            "rmin",
            "rmax",
            "cut_r",
            "sparse_dist_lim",
            "prior_sigma_factor",
            "shape_prior_sigma",
            "clip_sigma",
            "min_good_fraction",
            "refine_tol",
            "refine_max_step",
            "time_max_shift",
        ):
            v = getattr(self, name)
            if not is_num(v) or not np.isfinite(v):
                raise ValueError(f"PRF parameter {name} must be a finite number, got {v!r}")
        if not 0 < self.rmin < self.rmax:
            raise ValueError(
                f"PRF parameters need 0 < rmin < rmax (arcsec), got rmin={self.rmin}, rmax={self.rmax}"
            )
        if not 0 <= self.cut_r < self.rmax:
            raise ValueError(f"PRF parameter cut_r must be in [0, rmax={self.rmax}) arcsec, got {self.cut_r}")
        if self.sparse_dist_lim < self.rmax:
            raise ValueError(
                f"PRF parameter sparse_dist_lim ({self.sparse_dist_lim} arcsec) must be >= rmax "
                f"({self.rmax} arcsec): the model would be cut off"
            )
        if self.shape_phi_smooth is not None and (
            not is_num(self.shape_phi_smooth) or not 0 < self.shape_phi_smooth < np.inf
        ):
            raise ValueError(
                f"PRF parameter shape_phi_smooth must be None or a number > 0 (dex), "
                f"got {self.shape_phi_smooth!r}"
            )
        rh = self.refine_huber
        if rh is not None and (not is_num(rh) or not 0 < rh < np.inf):
            raise ValueError(f"PRF parameter refine_huber must be None or a number > 0, got {rh!r}")
        cd = self.crowded_dominance
        if cd is not None and (not is_num(cd) or not 0.5 < cd <= 1):
            raise ValueError(f"PRF parameter crowded_dominance must be None or in (0.5, 1], got {cd!r}")
        for name in (
            "prior_sigma_factor",
            "shape_prior_sigma",
            "clip_sigma",
            "refine_tol",
            "refine_max_step",
            "time_max_shift",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"PRF parameter {name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.min_good_fraction <= 1:
            raise ValueError(
                f"PRF parameter min_good_fraction must be in (0, 1], got {self.min_good_fraction}"
            )
        if not isinstance(self.sources_flux_column, str) or not self.sources_flux_column:
            raise ValueError(
                f"PRF parameter sources_flux_column must be a column name, got {self.sources_flux_column!r}"
            )
        if self.flux_cut_off is not None and (
            not is_num(self.flux_cut_off) or not self.flux_cut_off >= 0 or not np.isfinite(self.flux_cut_off)
        ):
            raise ValueError(
                f"PRF parameter flux_cut_off must be None or a finite number >= 0 (data units), "
                f"got {self.flux_cut_off!r}"
            )
        fi = self.frame_index
        if not (fi == "mean" if isinstance(fi, str) else is_int(fi)):
            raise ValueError(f"PRF parameter frame_index must be 'mean' or an integer, got {fi!r}")
        b = self.bin_data
        if not (b is None or isinstance(b, bool | np.bool_) or (is_int(b) and (b == 0 or b >= 4))):
            raise ValueError(f"PRF parameter bin_data must be False, True or an integer >= 4, got {b!r}")
        if not isinstance(self.time_model, bool | np.bool_):
            raise ValueError(f"PRF parameter time_model must be a bool, got {self.time_model!r}")
        if self.transform not in TRANSFORM_TERMS:
            raise ValueError(
                f"PRF parameter transform must be one of {sorted(TRANSFORM_TERMS)}, got {self.transform!r}"
            )
        tc = self.time_core_radius
        if tc is not None and (not is_num(tc) or not 0 < tc <= self.rmax):
            raise ValueError(
                f"PRF parameter time_core_radius must be None or in (0, rmax={self.rmax}] arcsec, got {tc!r}"
            )
        if not isinstance(self.perturbation, bool | np.bool_):
            raise ValueError(f"PRF parameter perturbation must be a bool, got {self.perturbation!r}")
        if self.perturbation and not self.time_model:
            raise ValueError(
                "PRF parameter perturbation needs time_model=True (it is applied after the transform)"
            )
        tr = self.time_radius
        if tr is not None and (not is_num(tr) or not 0 < tr < np.inf):
            raise ValueError(f"PRF parameter time_radius must be None or a number > 0 (arcsec), got {tr!r}")
        if not isinstance(self.fit_background, bool | np.bool_):
            raise ValueError(f"PRF parameter fit_background must be a bool, got {self.fit_background!r}")
        if self.time_mask is not None:
            tm = np.asarray(self.time_mask)
            if tm.ndim != 1 or tm.dtype != bool:
                raise ValueError("PRF parameter time_mask must be a 1-d boolean array (one entry per frame)")
            if not tm.any():
                raise ValueError("PRF parameter time_mask selects no frame")
            self.time_mask = tm
        for name in ("prior_mu", "prior_sigma"):
            v = getattr(self, name)
            if v is None:
                continue
            a = np.asarray(v, dtype=float)
            if a.ndim > 1:
                raise ValueError(f"PRF parameter {name} must be a scalar or a 1-d array (one per source)")
            if name == "prior_mu" and not np.all(np.isfinite(a)):
                raise ValueError("PRF parameter prior_mu must be finite")
            if name == "prior_sigma" and not np.all(a > 0):
                raise ValueError("PRF parameter prior_sigma must be > 0 (inf allowed: no prior)")
        return self

    @property
    def n_bins(self) -> int:
        """Bins per axis of ``bin_data`` (0: no binning)."""
        if self.bin_data is None or self.bin_data is False:
            return 0
        if self.bin_data is True:
            return 4 * max(self.n_r_knots, self.n_phi_knots)
        return int(self.bin_data)

    def to_dict(self) -> dict:
        """JSON-safe dict of the scalar parameters (arrays become lists).

        Returns
        -------
        dict
        """
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PRFParameters:
        """Inverse of :meth:`to_dict` (unknown keys are an error).

        Parameters
        ----------
        d : dict

        Returns
        -------
        PRFParameters
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PRF parameter(s): {sorted(unknown)}")
        d = dict(d)
        if d.get("time_mask") is not None:
            d["time_mask"] = np.asarray(d["time_mask"], dtype=bool)
        for k in ("prior_mu", "prior_sigma"):
            if isinstance(d.get(k), list):
                d[k] = np.asarray(d[k], dtype=float)
        return cls(**d)


#: Every PRF parameter's default, by name (what the CLI and the flow show).
PRF_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(PRFParameters) if f.default is not dataclasses.MISSING
}
