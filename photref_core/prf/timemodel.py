"""The PRF time model, part 1 (SPEC 6): pointing drift and plate-scale change as a per-frame transform.

Over a campaign the stars drift on the detector by what the frames' WCS does not follow (pointing drift,
velocity aberration): a common shift and a change of plate scale. A mean-frame shape model then sits at
the wrong place in every frame, and the fluxes scatter with the drift (measured on a Roman-like field with
0.5 pix of drift: 2.8-3.3x the time scatter of the true PRF at the true positions; 5.9x Kepler-like).

**The transform.** Per frame, every source moves from where the frame's WCS puts it by

    shift_x = a0 + a2 u + a3 v,        shift_y = a1 + a4 u + a5 v        (``affine``, pixels),

``u, v`` the source's position from the frame centre in half-widths; ``scale`` keeps ``a0, a1`` and one
isotropic term (``shift = a + s (u, v)``), ``shift`` only ``a0, a1`` (which cannot follow a plate-scale
change). A source moved by ``s`` pixels sees a pixel at tangent-plane offset ``(xi, eta) - J s`` (``J``
the source's local WCS Jacobian), so the model is evaluated at moved offsets on a fixed set of pairs:
every pixel within ``rmax`` + ``time_max_shift`` pixels of the source (so the flux solve's pattern never
changes; a pair outside ``rmax`` is an explicit zero).

**The fit of one frame** (:func:`fit_frame_transform`): from a starting transform, each iteration solves
the fluxes (all sources, the same solve as the static fit, on the moved model) and takes a Gauss-Newton
step of the transform, the scene linearised with the PRF's analytic position derivatives (B-spline
derivatives, :meth:`~.shape.ShapeModel.log_value_gradient`) on the pairs within ``time_core_radius`` of
their source (the core pixels carry the position information). The step is one of the joint (flux,
transform) problem: the coupling ``X^T W J`` is solved through the frame's flux normal matrix in the same
solve, and the transform's normal matrix is its Schur complement (``J`` linearised at the previous
iteration's fluxes). Alternating a flux solve with a transform-only step converged linearly (each step
~10x shorter than the last on the test fields); the joint step ~50x. ``time_iterations`` steps at most,
stopping once a step would move no source by 5e-4 px (the fluxes just solved are kept), else a last flux
solve at the final transform gives the fluxes and errors: two or three model evaluations a frame.

**The shape at build time** (:func:`build_time_model`): a mean frame of a drifting field is blurred, and
its shape absorbs the mean offset; the shape's core has no angular freedom, so an off-centre PRF cannot be
represented and refitting alone does not move it (measured: 2.0x). So, for ``time_rounds`` rounds on up to
``time_build_frames`` frames spread over the ``time_mask`` frames: add the shape's centroid within 1.5
pixels to every frame's shift (re-centre), refit the shape jointly on those frames at their own transforms
with their own fluxes (the joint all-pixel refinement, :mod:`.refine`), refit the transforms. The added
offset shrinks each round (the recipe measured 0.098 -> 0.039 -> 0.014 px on a Kepler-like field).

The static shape (the mean frame's) is kept beside this one: the fluxes without the time model are what a
run without it gives.

**Part 2** (``params.perturbation``, :mod:`.perturbation`): after the rounds, the PRF's shape change over
time is fitted as a factor per source offset and time, and every frame's fit multiplies the moved model by
it at the frame's time (:meth:`_FramePairs.values`' ``factor``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import sparse
from threadpoolctl import threadpool_limits

from .fluxfit import FrameOutputs, flux_prior_terms, solve_batch
from .fluxfit import model_image as frames_model
from .geometry import Geometry
from .inputs import frame_stacks, gather_pixels, per_frame_wcs
from .parameters import TRANSFORM_TERMS
from .perturbation import Perturbation, build_perturbation
from .refine import JointPixels, refine_shape
from .shape import ShapeModel
from .solver import FitResult, SolvePlan

__all__ = [
    "CENTROID_RADIUS_PX",
    "TimeModel",
    "build_time_model",
    "fit_frame_transform",
    "fit_frames_with_transform",
    "moved_geometry",
    "shape_centroid",
    "source_shifts",
    "transform_basis",
]

#: Radius (pixels) of the window in which the shape's centroid is measured when re-centring.
CENTROID_RADIUS_PX = 1.5

_LN10 = math.log(10.0)
_CONVERGED_PX = 5e-4  # converged: a step moves no source by more (0.5 mpix, 4x below the 2 mpix target)


@dataclasses.dataclass(eq=False)
class TimeModel:
    """The time model of a PRF model: its re-centred shape and the transforms of its build frames.

    Attributes
    ----------
    kind : str
        A key of :data:`~.parameters.TRANSFORM_TERMS`.
    shape : ShapeModel
        The shape rebuilt at the fitted positions (re-centred).
    times : numpy.ndarray
        Times of the build frames (any unit; frame indices when the build had no times).
    transforms : numpy.ndarray
        (n_build_frames, nterms) their fitted transforms.
    diagnostics : dict
        ``recentre_px`` (the offset added in each round, pixels) and the refinements' summaries.
    perturbation : Perturbation or None
        Part 2, the PRF's shape change (:mod:`.perturbation`), when built.
    """

    kind: str
    shape: ShapeModel
    times: np.ndarray
    transforms: np.ndarray
    diagnostics: dict = dataclasses.field(default_factory=dict)
    perturbation: Perturbation | None = None

    @property
    def terms(self) -> tuple:
        """Names of the transform's terms."""
        return TRANSFORM_TERMS[self.kind]

    def start(self, time=None) -> np.ndarray:
        """A starting transform for a frame: the build transforms interpolated at ``time`` (their median
        when ``time`` is None or the build had one frame)."""
        if time is None or self.times.size < 2 or not np.isfinite(time):
            return np.median(self.transforms, axis=0)
        order = np.argsort(self.times)
        t, a = self.times[order], self.transforms[order]
        return np.array([np.interp(time, t, a[:, k]) for k in range(a.shape[1])])


def transform_basis(kind: str, g: Geometry):
    """``(Bx, By)``, each (nsources, nterms): a source's shift is ``(Bx @ a, By @ a)`` pixels.

    Parameters
    ----------
    kind : str
        A key of :data:`TRANSFORM_TERMS`.
    g : Geometry
        The sources on the frame (their pixel positions give ``u``, ``v``).

    Returns
    -------
    tuple of numpy.ndarray
    """
    ny, nx = g.shape
    u = np.nan_to_num((g.xpix - (nx - 1) / 2.0) / (nx / 2.0))
    v = np.nan_to_num((g.ypix - (ny - 1) / 2.0) / (ny / 2.0))
    one, zero = np.ones_like(u), np.zeros_like(u)
    if kind == "shift":
        return np.stack([one, zero], 1), np.stack([zero, one], 1)
    if kind == "scale":
        return np.stack([one, zero, u], 1), np.stack([zero, one, v], 1)
    if kind == "affine":
        return np.stack([one, zero, u, v, zero, zero], 1), np.stack([zero, one, zero, zero, u, v], 1)
    raise ValueError(f"unknown transform {kind!r}: one of {sorted(TRANSFORM_TERMS)}")


def source_shifts(kind: str, g: Geometry, a) -> tuple[np.ndarray, np.ndarray]:
    """Every source's shift (pixels) under the transform ``a``.

    Parameters
    ----------
    kind : str
    g : Geometry
    a : array_like
        (nterms,)

    Returns
    -------
    tuple of numpy.ndarray
        ``(sx, sy)``, (nsources,) each.
    """
    bx, by = transform_basis(kind, g)
    a = np.asarray(a, dtype=float)
    return bx @ a, by @ a


def moved_geometry(g: Geometry, sx, sy) -> Geometry:
    """The geometry of the same (source, pixel) pairs after every source moved by ``(sx, sy)`` pixels.

    Parameters
    ----------
    g : Geometry
    sx, sy : numpy.ndarray
        (nsources,) shifts in pixels.

    Returns
    -------
    Geometry
        Offsets, radii and angles of the moved sources; pairs, areas and Jacobians unchanged.
    """
    j = g.jac[g.src]
    dxs, dys = np.asarray(sx)[g.src], np.asarray(sy)[g.src]
    xi = g.xi - (j[:, 0, 0] * dxs + j[:, 0, 1] * dys)
    eta = g.eta - (j[:, 1, 0] * dxs + j[:, 1, 1] * dys)
    return dataclasses.replace(
        g,
        xi=xi,
        eta=eta,
        r=np.hypot(xi, eta),
        phi=np.arctan2(eta, xi),
        xpix=g.xpix + sx,
        ypix=g.ypix + sy,
    )


class _FramePairs:
    """One frame WCS's fixed (source, pixel) pairs for moving sources, and their solve plan."""

    def __init__(self, shape: ShapeModel, g: Geometry, kind: str, max_shift_px: float):
        jac = np.nan_to_num(g.jac)
        scale = np.sqrt(np.linalg.eigvalsh(np.einsum("sji,sjk->sik", jac, jac))[:, -1])  # largest, arcsec/px
        reach = shape.rmax + max_shift_px * scale[g.src]
        keep = g.r <= reach
        self.geom = Geometry(
            shape=g.shape,
            src=g.src[keep],
            pix=g.pix[keep],
            xi=g.xi[keep],
            eta=g.eta[keep],
            r=g.r[keep],
            phi=g.phi[keep],
            indptr=np.concatenate([[0], np.cumsum(np.bincount(g.src[keep], minlength=g.nsources))]),
            jac=g.jac,
            area=g.area,
            xpix=g.xpix,
            ypix=g.ypix,
        )
        self.kind = kind
        self.bx, self.by = transform_basis(kind, self.geom)
        self.plan = None

    def shifts(self, a):
        return self.bx @ a, self.by @ a

    def values(self, shape: ShapeModel, a, core_radius=None, factor=None):
        """Model values of every pair at the transform ``a``; with ``core_radius`` (arcsec) also the pairs
        within it and their value derivatives with respect to the source's shift (per pixel). ``factor``:
        the perturbation (:meth:`.perturbation.Perturbation.at`), a function of the moved offsets that
        multiplies the values (and the derivatives: its own change with the shift is neglected, it is ~1
        and smooth)."""
        sx, sy = self.shifts(a)
        mg = moved_geometry(self.geom, sx, sy)
        vals = np.zeros(mg.r.size)
        area = mg.area[mg.src]
        inside = np.flatnonzero(mg.r <= shape.rmax)
        scale = None if factor is None else factor(mg.xi[inside], mg.eta[inside])
        if core_radius is None:
            vals[inside] = 10.0 ** shape.log_value(mg.r[inside], mg.phi[inside]) / shape.norm * area[inside]
            if scale is not None:
                vals[inside] *= scale
            return vals, None
        core_radius = min(core_radius, shape.rmax)
        core = np.flatnonzero(mg.r <= core_radius)
        rest = np.flatnonzero((mg.r > core_radius) & (mg.r <= shape.rmax))
        vals[rest] = 10.0 ** shape.log_value(mg.r[rest], mg.phi[rest]) / shape.norm * area[rest]
        s, s_r, s_phi = shape.log_value_gradient(mg.r[core], mg.phi[core])
        v = 10.0**s / shape.norm * area[core]
        vals[core] = v
        r = np.maximum(mg.r[core], 1e-12)
        c, sn = np.cos(mg.phi[core]), np.sin(mg.phi[core])
        s_xi = s_r * c - s_phi * sn / r
        s_eta = s_r * sn + s_phi * c / r
        j = mg.jac[mg.src[core]]
        # d(xi, eta)/d(shift) = -J: a source moving +x moves every offset by -J[:, 0].
        d_sx = -_LN10 * v * (s_xi * j[:, 0, 0] + s_eta * j[:, 1, 0])
        d_sy = -_LN10 * v * (s_xi * j[:, 0, 1] + s_eta * j[:, 1, 1])
        if scale is not None:
            full = np.ones(mg.r.size)
            full[inside] = scale
            vals *= full
            d_sx, d_sy = d_sx * full[core], d_sy * full[core]
        return vals, (core, d_sx, d_sy)

    def matrix(self, vals) -> sparse.csr_array:
        g = self.geom
        return sparse.csr_array((vals, g.pix, g.indptr), shape=(g.nsources, g.npixels))

    def solve_plan(self, X) -> SolvePlan:
        if self.plan is None:
            self.plan = SolvePlan(X, keep_zeros=True)
        else:
            self.plan.refresh(X)
        return self.plan


def _frame_pairs(model, shape: ShapeModel, wcs, image_shape) -> _FramePairs:
    """The fixed pairs of a frame WCS for the time model, cached in the model's frame cache."""
    ent = model.frames.entry(wcs, image_shape)
    p = model.params
    key = ("time_pairs", p.transform, float(p.time_max_shift), shape.rmax)
    if ent.get("time_pairs_key") != key:
        g = model.frames.geometry(wcs, image_shape)
        ent["time_pairs"] = _FramePairs(shape, g, p.transform, p.time_max_shift)
        ent["time_pairs_key"] = key
    return ent["time_pairs"]


def core_radius(params) -> float:
    """The radius (arcsec) of the pixels whose position derivatives fit the transform."""
    return float(params.time_core_radius) if params.time_core_radius is not None else 0.3 * params.rmax


def _core_jacobian(dprf, flux, row, npix):
    """``d model_p / d a_k = sum_i F_i dPRF_ip / d a_k`` on the core pixels: the pairs' per-unit-flux
    derivatives (pairs x terms) times their source's flux, summed per pixel (``row``: a pair's pixel)."""
    dm = flux[:, None] * dprf
    return np.stack([np.bincount(row, weights=dm[:, k], minlength=npix) for k in range(dprf.shape[1])], 1)


def fit_frame_transform(pairs: _FramePairs, shape: ShapeModel, f, e, m, a0, mu, isig2, params, factor=None):
    """Fit one frame's transform and fluxes (the module docstring's alternation).

    Parameters
    ----------
    pairs : _FramePairs
        The frame WCS's pairs.
    shape : ShapeModel
    f, e : numpy.ndarray
        (npix,) data and errors of the frame.
    m : numpy.ndarray or None
        (npix,) bad-pixel mask.
    a0 : numpy.ndarray
        Starting transform.
    mu, isig2 : numpy.ndarray
        Flux prior (means, 1/sigma^2).
    params : PRFParameters
    factor : callable, optional
        The perturbation at the frame's time (:meth:`.perturbation.Perturbation.at`).

    Returns
    -------
    tuple
        ``(a, solve)``: the transform and :func:`~.fluxfit.solve_batch`'s result at it (one frame).
    """
    a = np.array(a0, dtype=float)
    F, E = f[None, :], e[None, :]
    M = None if m is None else m[None, :]
    rc = core_radius(params)
    ns = pairs.geom.nsources
    amp_prev = np.asarray(mu, dtype=float)  # the fluxes the coupling is linearised at (then the last fit's)
    for _ in range(int(params.time_iterations)):
        vals, (core, d_sx, d_sy) = pairs.values(shape, a, rc, factor)
        plan = pairs.solve_plan(pairs.matrix(vals))
        src, pix = pairs.geom.src[core], pairs.geom.pix[core]
        upix, row = np.unique(pix, return_inverse=True)
        at = np.searchsorted(plan.pix_u, upix)
        fu, w, _ = (x[0] for x in gather_pixels(F, E, M, upix))
        # d model_p / d a_k = sum_i F_i (dPRF_ip/dsx Bx_ik + dPRF_ip/dsy By_ik) over the core pairs, per
        # unit flux; the Jacobian is that times the fluxes.
        dprf = d_sx[:, None] * pairs.bx[src] + d_sy[:, None] * pairs.by[src]
        # The coupling of fluxes and transform, X^T W J: its solutions through the flux normal matrix make the
        # step one of the joint problem (a Schur complement), not of the transform alone.
        J0 = _core_jacobian(dprf, amp_prev[src], row, upix.size)
        WJ = np.zeros((plan.pix_u.size, a.size))
        WJ[at] = w[:, None] * J0
        coupling = plan.Xc @ WJ
        res = solve_batch(plan, F, E, M, mu, isig2, params, extra=coupling)
        solved_coupling, res = res[7], res[:7]
        amp = np.nan_to_num(res[6][0], nan=0.0, posinf=0.0, neginf=0.0)
        bg = float(res[4][0]) if res[4] is not None else 0.0
        resid = fu - (plan.Xc.T @ amp)[at] - bg  # every source's light on the core pixels
        J = _core_jacobian(dprf, amp[src], row, upix.size)
        g = J.T @ (w * resid)
        schur = J0.T @ (J0 * w[:, None]) - coupling.T @ solved_coupling
        try:
            da = np.linalg.solve(schur, g)
        except np.linalg.LinAlgError:
            da = np.linalg.lstsq(schur, g, rcond=None)[0]
        if not np.all(np.isfinite(da)):
            break
        sx, sy = pairs.shifts(da)
        move = float(np.max(np.hypot(sx, sy))) if ns else 0.0
        if move < _CONVERGED_PX:  # the fluxes just solved are those of the converged transform
            return a, res
        limit = 0.5 * float(params.time_max_shift)  # a linearised step longer than this is not trusted
        if move > limit:
            da *= limit / move
        a = a + da
        amp_prev = amp
    vals, _ = pairs.values(shape, a, factor=factor)
    plan = pairs.solve_plan(pairs.matrix(vals))
    return a, solve_batch(plan, F, E, M, mu, isig2, params)


def fit_frames_with_transform(
    model,
    flux,
    flux_err=None,
    mask=None,
    wcs=None,
    times=None,
    return_model=False,
    gain=1.0,
    rdnoise=0.0,
    prior_mu=None,
    prior_sigma=None,
) -> FitResult:
    """:meth:`PRFModel.fit <photref_core.prf.model.PRFModel.fit>` with the model's time model: each frame's
    transform and fluxes (:func:`fit_frame_transform`), frames in order, each starting from the previous
    frame's transform (the first from the build transforms at its time)."""
    tmod = model.time_model
    flux, err, mask = frame_stacks(flux, flux_err, mask, gain, rdnoise)
    T, ny, nx = flux.shape
    wcs_list = per_frame_wcs(model.wcs if wcs is None else wcs, T)
    mu, isig2 = flux_prior_terms(model, prior_mu, prior_sigma)
    times = None if times is None else np.asarray(times, dtype=float)
    out = FrameOutputs(T, model.nsources, bool(model.params.fit_background))
    transforms = np.full((T, len(tmod.terms)), np.nan)
    model_image = np.zeros((T, ny * nx)) if return_model else None
    pert = tmod.perturbation
    if pert is not None and times is None:
        raise ValueError("this PRF model's time model has a perturbation: the fit needs the frames' times")
    a = tmod.start(None if times is None else times[0])
    with threadpool_limits(limits=1, user_api="blas"):
        for t in range(T):
            pairs = _frame_pairs(model, tmod.shape, wcs_list[t], (ny, nx))
            m = None if mask is None else mask[t].ravel()
            factor = None if pert is None else pert.at(float(times[t]))
            a, solution = fit_frame_transform(
                pairs, tmod.shape, flux[t].ravel(), err[t].ravel(), m, a, mu, isig2, model.params, factor
            )
            transforms[t] = a
            out.put([t], solution)
            if return_model:  # the plan holds the model at the returned transform
                model_image[t] = frames_model(pairs.plan, solution[6], solution[4])[0]
    return out.result(
        model.source_ids,
        transform=transforms,
        transform_terms=tmod.terms,
        model=None if model_image is None else model_image.reshape(T, ny, nx),
    )


def shape_centroid(shape: ShapeModel, radius: float, n_gauss: int = 8) -> tuple[float, float]:
    """The centroid (xi, eta; arcsec) of the normalised PRF within ``radius`` arcsec of its origin.

    Parameters
    ----------
    shape : ShapeModel
    radius : float
        Arcsec (clipped to ``rmax``).
    n_gauss : int
        Gauss-Legendre nodes per radial knot span.

    Returns
    -------
    tuple of float
    """
    rr, pp, area = shape.disc_nodes(radius, n_gauss)
    w = shape.density(rr, pp) * area
    total = float(np.sum(w))
    return float(np.sum(w * rr * np.cos(pp)) / total), float(np.sum(w * rr * np.sin(pp)) / total)


def _build_frames(tm, n_max: int) -> np.ndarray:
    """Up to ``n_max`` of the ``time_mask`` frames, evenly spread (first and last included)."""
    idx = np.flatnonzero(tm)
    if idx.size <= n_max:
        return idx
    return idx[np.unique(np.round(np.linspace(0, idx.size - 1, n_max)).astype(int))]


def build_time_model(model, flux, err, mask, wcs_list, tm, times, w_prior) -> TimeModel:
    """Fit the build frames' transforms and the re-centred shape (the module docstring's rounds).

    Parameters
    ----------
    model : PRFModel
        The model with its static shape fitted (its flux prior set).
    flux, err : numpy.ndarray
        (T, ny, nx) frames and errors.
    mask : numpy.ndarray or None
        (T, ny, nx) bad pixels.
    wcs_list : list of astropy.wcs.WCS
    tm : numpy.ndarray of bool
        The frames the shape may use (``time_mask``).
    times : numpy.ndarray or None
        (T,) frame times (for the starting transforms of later fits); frame indices when None.
    w_prior : numpy.ndarray
        Mean of the shape prior (the empirical profile's weights).

    Returns
    -------
    TimeModel
    """
    p = model.params
    T, ny, nx = flux.shape
    frames = _build_frames(tm, int(p.time_build_frames))
    times = np.arange(T, dtype=float) if times is None else np.asarray(times, dtype=float)
    sm = model.shape
    shape = ShapeModel(sm.n_r_knots, sm.n_phi_knots, sm.rmin, sm.rmax, sm.cut_r, weights=sm.weights.copy())
    mu, isig2 = model.prior_mu, 1.0 / model.prior_sigma**2
    kind = p.transform
    nterms = len(TRANSFORM_TERMS[kind])

    def fit_all(a_start, chain):
        """Every build frame's transform: from ``a_start[k]``, or (``chain``) from the previous frame's."""
        out, a = np.zeros((frames.size, nterms)), a_start[0]
        for k, t in enumerate(frames):
            pairs = _frame_pairs(model, shape, wcs_list[t], (ny, nx))
            m = None if mask is None else mask[t].ravel()
            start = a if chain else a_start[k]
            a, _ = fit_frame_transform(pairs, shape, flux[t].ravel(), err[t].ravel(), m, start, mu, isig2, p)
            out[k] = a
        return out

    diag = {"build_frames": frames.tolist(), "recentre_px": [], "refine": []}
    with threadpool_limits(limits=1, user_api="blas"):
        A = fit_all(np.zeros((frames.size, nterms)), chain=True)
        # The centroid's window and its conversion to pixels: the first build frame's median Jacobian.
        g0 = model.frames.geometry(wcs_list[frames[0]], (ny, nx))
        jac = np.median(g0.jac[np.isfinite(g0.jac).all(axis=(1, 2))], axis=0)
        window = CENTROID_RADIUS_PX * math.sqrt(abs(np.linalg.det(jac)))
        for _ in range(int(p.time_rounds)):
            cxi, ceta = shape_centroid(shape, window)
            cx, cy = np.linalg.solve(jac, [cxi, ceta])
            diag["recentre_px"].append([float(cx), float(cy)])
            A[:, 0] += cx
            A[:, 1] += cy
            # Each frame at its re-centred transform: its pixels for the refinement, and its amplitudes
            # (a prior-free flux solve with the current shape).
            problems, fluxes = [], []
            for k, t in enumerate(frames):
                pairs = _frame_pairs(model, shape, wcs_list[t], (ny, nx))
                good = np.isfinite(flux[t]) & np.isfinite(err[t]) & (err[t] > 0)
                if mask is not None:
                    good &= ~mask[t]
                image, error = np.where(good, flux[t], 0.0), np.where(good, err[t], np.inf)
                sx, sy = pairs.shifts(A[k])
                epoch = {"flux": image, "err": error, "good": good}
                problems.append(JointPixels(shape, moved_geometry(pairs.geom, sx, sy), epoch))
                plan = pairs.solve_plan(pairs.matrix(pairs.values(shape, A[k])[0]))
                solution = solve_batch(
                    plan, image.ravel()[None], error.ravel()[None], ~good.ravel()[None], mu, 0.0 * mu, p
                )
                fluxes.append(solution[6][0])
            diag["refine"].append(refine_shape(shape, problems, lambda fl=fluxes: fl, w_prior, p))
            A = fit_all(A, chain=False)
    diag["transforms"] = A.tolist()
    tmod = TimeModel(kind=kind, shape=shape, times=times[frames], transforms=A, diagnostics=diag)
    if p.perturbation:

        def fit_transform(wcs, f, e, m, a0):
            pairs = _frame_pairs(model, shape, wcs, (ny, nx))
            with threadpool_limits(limits=1, user_api="blas"):
                a, solution = fit_frame_transform(pairs, shape, f, e, m, a0, mu, isig2, p)
            return a, solution, pairs

        tmod.perturbation = build_perturbation(
            model, shape, flux, err, mask, wcs_list, np.flatnonzero(tm), times, tmod.start, fit_transform, p
        )
    return tmod
