"""Simulated PRF test fields with a known truth, and how a PRF fit is scored against it (SPEC 6).

Three samplings stand for the surveys photref serves: Roman-like (0.11"/pix, FWHM 2.2 px), Kepler-like
(4"/pix, FWHM 1.5 px) and TESS-like (21"/pix, FWHM 1.2 px). Every field has the same non-Gaussian,
asymmetric PRF (a pixel-integrated elliptical Moffat core, beta 2.5, axis ratio 0.9, plus a 6 % broad
wing whose centre is offset from the core's), a WCS rotated by 15 deg at dec +60, 15 % of the stars in
close pairs (1-2 FWHM) and catalog fluxes with 10 % log-normal scatter. The PRF radii are SPEC 6's
defaults (set for Roman's 0.11"/pix) scaled by ``pixscale / 0.11`` (:func:`spec_radii`), as a user
scales them for another survey.

The score (:func:`score_fluxes`) compares fitted fluxes with the truth over the isolated stars (no pair
member, not on the frame edge) and the pair members ("blends"); :func:`oracle_fit` fits the same frames
with the true PRF at the true positions, the best any PRF model can do on those frames.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ..prf.parameters import PRF_DEFAULTS
from .images import encircled_energy, prf_design, simulate_images

__all__ = [
    "FIELDS",
    "FIELD_PRF_OPTIONS",
    "load_frames",
    "oracle_fit",
    "score_fluxes",
    "simulate_field",
    "spec_radii",
    "time_scatter",
    "transform_error",
    "true_fluxes",
]

#: The PRF shared by every field (pixel units; see :func:`photref_core.simulate.images.prf_density`).
FIELD_PRF = dict(
    beta=2.5, ellipticity=0.1, theta=30.0, wing_fraction=0.06, wing_beta=3.0, wing_offset=(0.4, -0.3)
)

#: The wing's FWHM in units of the core's: broad, yet (with ``wing_beta``) < 0.1 % of the flux falls beyond
#: the scaled SPEC ``rmax`` (18.2 px). Light beyond ``rmax`` is outside the model by definition: a wider
#: wing needs a larger ``rmax`` (measured: a 5 x FWHM wing of beta 2.5 put 0.6 % of a Roman-like star's
#: flux beyond it and biased every flux up by 0.5 %).
WING_FWHM_FACTOR = 3.0

#: Field recipes: keyword arguments of :func:`~photref_core.simulate.images.simulate_images`.
FIELDS = {
    "roman": dict(pixscale=0.11, fwhm=2.2, n_stars=300, size=256),
    "kepler": dict(pixscale=4.0, fwhm=1.5, n_stars=200, size=128),
    "tess": dict(pixscale=21.0, fwhm=1.2, n_stars=200, size=128),
}

#: PRF options besides the scaled radii, per field. At 21"/pix the whole core lies within a pixel of the
#: centre, and SPEC's 10 radial knots (uniform in sqrt(r) out to 18 px) put one knot there: the model
#: cannot follow the core, and bright stars centred on a pixel come out biased by ~2 sigma (measured:
#: isolated chi std 1.13, 90th percentile of the per-star bias 0.9-1.02 sigma). 16 knots resolve it
#: (chi^2 per pixel of the mean frame 1.37 -> 1.01-1.05).
FIELD_PRF_OPTIONS = {"tess": dict(n_r_knots=16)}

_ROMAN_PIXSCALE = 0.11  # arcsec/pix: the sampling SPEC 6's default radii are written for


def spec_radii(pixscale: float) -> dict:
    """SPEC 6's default radii (arcsec, for 0.11"/pix) scaled to ``pixscale`` arcsec/pix.

    Parameters
    ----------
    pixscale : float

    Returns
    -------
    dict
        ``rmin``, ``rmax``, ``cut_r``, ``sparse_dist_lim`` in arcsec.
    """
    k = float(pixscale) / _ROMAN_PIXSCALE
    return {name: PRF_DEFAULTS[name] * k for name in ("rmin", "rmax", "cut_r", "sparse_dist_lim")}


def simulate_field(outdir, name: str, seed: int = 0, n_frames: int = 20, **overrides) -> dict:
    """Write one of :data:`FIELDS` (frames, catalog, truth) with the shared PRF.

    Parameters
    ----------
    outdir : str or os.PathLike
    name : str
        A key of :data:`FIELDS`.
    seed, n_frames : int
    **overrides
        Any other :func:`simulate_images` argument.

    Returns
    -------
    dict
        :func:`simulate_images`' result plus ``pixscale`` and ``prf_params``: the
        :class:`~photref_core.prf.parameters.PRFParameters` keywords for the field (:func:`spec_radii`
        and :data:`FIELD_PRF_OPTIONS`).
    """
    recipe = dict(FIELDS[name])
    kw = dict(
        FIELD_PRF,
        dec=60.0,
        rotation=15.0,
        catalog_scatter=0.10,
        n_variables=3,
        min_separation=0.0,
        n_frames=n_frames,
        seed=seed,
    )
    kw.update(recipe)
    kw["wing_fwhm"] = WING_FWHM_FACTOR * kw["fwhm"]
    kw.update(overrides)
    kw.setdefault("n_pairs", int(round(0.15 * kw["n_stars"] / 2)))  # 15 % of the stars in pairs
    sim = simulate_images(outdir, **kw)
    sim["prf_params"] = {**spec_radii(kw["pixscale"]), **FIELD_PRF_OPTIONS.get(name, {})}
    sim["pixscale"] = kw["pixscale"]
    return sim


def load_frames(paths):
    """Frames written by :func:`simulate_images` as arrays: flux, err, bad-pixel mask, WCS list.

    Parameters
    ----------
    paths : list of str

    Returns
    -------
    tuple
        ``(flux, err, mask, wcs)``: (T, ny, nx) float arrays, a (T, ny, nx) bool mask and T WCS.
    """
    flux, err, mask, wcs = [], [], [], []
    for p in paths:
        with fits.open(p) as h:
            flux.append(h[0].data.astype(float))
            err.append(h["ERR"].data.astype(float))
            mask.append(h["MASK"].data != 0)
            wcs.append(WCS(h[0].header))
    return np.array(flux), np.array(err), np.array(mask), wcs


def oracle_fit(sim, flux, err, mask):
    """Fluxes fitted with the TRUE PRF at the TRUE positions (a field without jitter; drift allowed).

    Per frame, weighted least squares of all sources at once on every good pixel (no prior): the
    best a PRF model can do on these frames. The fluxes are total fluxes (the true PRF integrates to 1
    over the plane). On a drifting field each frame's design is built at that frame's true positions, on a
    field with a focus change with that frame's true PRF.

    Parameters
    ----------
    sim : dict
        :func:`simulate_field` / :func:`simulate_images` result.
    flux, err, mask : numpy.ndarray
        (T, ny, nx) frames, errors and bad-pixel mask.

    Returns
    -------
    tuple of numpy.ndarray
        ``(flux, flux_err)``, each (T, nsources).
    """
    truth = Table.read(sim["truth"])
    if float(truth.meta.get("JITTER", 0.0)) != 0.0:
        raise ValueError("oracle_fit needs a field without jitter (one set of true positions)")
    ns = int(np.sum(truth["frame_id"] == truth["frame_id"][0]))
    T, ny, nx = flux.shape
    x0, y0 = np.asarray(truth["x"][:ns]), np.asarray(truth["y"][:ns])
    dx = np.asarray(truth["dx"]).reshape(T, ns) if "dx" in truth.colnames else np.zeros((T, ns))
    dy = np.asarray(truth["dy"]).reshape(T, ns) if "dy" in truth.colnames else np.zeros((T, ns))
    out, out_err = np.full((T, ns), np.nan), np.full((T, ns), np.nan)
    # A focus change (simulate_images' focus_change) gives each frame its core FWHM.
    fwhm = np.asarray(truth["fwhm"]).reshape(T, ns)[:, 0] if "fwhm" in truth.colnames else None
    design = None
    for t in range(T):
        if design is None or (
            t > 0
            and not (
                np.array_equal(dx[t], dx[t - 1])
                and np.array_equal(dy[t], dy[t - 1])
                and (fwhm is None or fwhm[t] == fwhm[t - 1])
            )
        ):
            prf = sim["prf"] if fwhm is None else dict(sim["prf"], fwhm=float(fwhm[t]))
            design = prf_design(x0 + dx[t], y0 + dy[t], (ny, nx), prf).tocsr()
        good = (~mask[t] & np.isfinite(flux[t]) & np.isfinite(err[t]) & (err[t] > 0)).ravel()
        A = design[np.flatnonzero(good)]
        w = 1.0 / err[t].ravel()[good] ** 2
        normal = (A.T @ (A.multiply(w[:, None]))).toarray()
        rhs = A.T @ (w * flux[t].ravel()[good])
        cov = np.linalg.inv(normal)
        out[t], out_err[t] = cov @ rhs, np.sqrt(np.diag(cov))
    return out, out_err


def score_fluxes(fitted, fitted_err, true, pair_id, edge):
    """How fitted fluxes compare with the truth.

    Parameters
    ----------
    fitted, fitted_err : numpy.ndarray
        (T, nsources) fluxes and errors (NaN where not fitted).
    true : numpy.ndarray
        (T, nsources) the flux the fit should return (the true flux times the encircled energy of the
        modelled disc for photref, the true total flux for the oracle).
    pair_id, edge : numpy.ndarray
        Per source: pair number (-1: not in a pair) and whether it sits on the frame edge.

    Returns
    -------
    dict
        ``isolated_median_abs_rel_err``, ``flux_scale`` (median fitted/true of isolated stars),
        ``isolated_chi_std``, ``blends_chi_std`` (std of (fitted - true) / error), ``max_star_bias_sigma``
        and ``p90_star_bias_sigma`` (the largest and the 90th percentile over the isolated stars of
        |time-mean of (fitted - true)| in units of the star's median error: a bias that follows the star),
        ``bright_minus_faint_bias`` (median time-mean relative error of the brighter half of the isolated
        stars minus that of the fainter half: a bias that follows brightness) and ``n_isolated``,
        ``n_blends``.
    """
    iso = (np.asarray(pair_id) < 0) & ~np.asarray(edge, bool)
    blend = np.asarray(pair_id) >= 0
    ok = np.isfinite(fitted) & np.isfinite(fitted_err) & (fitted_err > 0)
    rel = fitted / true - 1.0
    chi = (fitted - true) / np.where(ok, fitted_err, np.nan)
    iso_ok = ok & iso[None, :]
    bl_ok = ok & blend[None, :]
    # Per isolated star with at least one fitted frame: time-mean error, absolute and relative.
    has = iso & iso_ok.any(axis=0)
    n_ok = np.maximum(iso_ok.sum(axis=0), 1)
    mean_diff = np.where(iso_ok, fitted - true, 0.0).sum(axis=0) / n_ok
    mean_rel = np.where(iso_ok, rel, 0.0).sum(axis=0) / n_ok
    typical_err = np.array(
        [np.median(fitted_err[iso_ok[:, i], i]) if has[i] else np.nan for i in range(has.size)]
    )
    bias = np.abs(mean_diff[has]) / typical_err[has]
    brightness = np.mean(true, axis=0)[has]
    bright = brightness >= np.median(brightness)
    return {
        "isolated_median_abs_rel_err": float(np.median(np.abs(rel[iso_ok]))),
        "flux_scale": float(np.median((fitted / true)[iso_ok])),
        "isolated_chi_std": float(np.std(chi[iso_ok])),
        "blends_chi_std": float(np.std(chi[bl_ok])) if bl_ok.any() else float("nan"),
        "max_star_bias_sigma": float(np.max(bias)),
        "p90_star_bias_sigma": float(np.percentile(bias, 90)),
        "bright_minus_faint_bias": float(
            np.median(mean_rel[has][bright]) - np.median(mean_rel[has][~bright])
        ),
        "n_isolated": int(iso.sum()),
        "n_blends": int(blend.sum()),
    }


def true_fluxes(sim, rmax_arcsec=None):
    """The (T, nsources) true fluxes; times the true PRF's encircled energy within ``rmax_arcsec``
    (what a PRF weight measures, SPEC 6) when it is given.

    Parameters
    ----------
    sim : dict
    rmax_arcsec : float, optional

    Returns
    -------
    numpy.ndarray
    """
    truth = Table.read(sim["truth"])
    ns = int(np.sum(truth["frame_id"] == truth["frame_id"][0]))
    true = np.asarray(truth["flux"]).reshape(-1, ns)
    if rmax_arcsec is None:
        return true
    return true * encircled_energy(rmax_arcsec / float(truth.meta["PIXSCALE"]), sim["prf"])


def time_scatter(fitted, true, pair_id, edge) -> float:
    """The median over isolated stars (no pair member, not on the edge) of the standard deviation over
    frames of fitted / true: how much a light curve scatters (a variable star's variation divided out).

    Parameters
    ----------
    fitted, true : numpy.ndarray
        (T, nsources) fitted fluxes (NaN where not fitted) and what the fit should return.
    pair_id, edge : numpy.ndarray
        Per source, as in :func:`score_fluxes`.

    Returns
    -------
    float
    """
    iso = (np.asarray(pair_id) < 0) & ~np.asarray(edge, bool)
    return float(np.nanmedian(np.nanstd((fitted / true)[:, iso], axis=0)))


def transform_error(sim, shifts) -> np.ndarray:
    """Fitted source shifts minus the true displacements (:func:`simulate_images`' ``drift``), pixels,
    less their mean over frames and sources: a transform is defined up to where the model puts a
    source's centre (the re-centred shape's centroid within 1.5 pixels), a constant.

    Parameters
    ----------
    sim : dict
    shifts : numpy.ndarray
        (T, 2, nsources) fitted x and y shifts of every source in every frame.

    Returns
    -------
    numpy.ndarray
        (T, 2, nsources) of the sources not on the edge.
    """
    truth = Table.read(sim["truth"])
    T, _, ns = shifts.shape
    true = np.stack([np.asarray(truth["dx"]).reshape(T, ns), np.asarray(truth["dy"]).reshape(T, ns)], axis=1)
    inside = ~np.asarray(truth["edge"][:ns], bool)
    err = (shifts - true)[:, :, inside]
    return err - err.mean(axis=(0, 2), keepdims=True)
