"""Simulated pixel frames with a known truth, for PRF photometry (SPEC 1.3 and 6).

The simulated field is what a PRF photometry pipeline sees on a real detector, with everything a test
needs to check the answer:

* a TAN WCS at high declination (``dec=70`` by default) with a rotated, square pixel grid, so that a code
  that forgets ``cos(dec)`` gets the geometry (and the flux scale) wrong;
* a PRF that is **not** a Gaussian: an elliptical Moffat core plus a faint, wide, circular Moffat wing,
  integrated over each pixel by sub-pixel sampling, the same everywhere in the field;
* fluxes spread over ``flux_range`` (two decades by default, log-uniform), a few crowded pairs at 1-2 FWHM,
  a few variable stars, optionally stars on the frame edge (one of them centred outside the frame);
* Poisson noise (on star + sky, in electrons through ``GAIN``) and read noise, all drawn from ``seed``;
  the sky is subtracted, so frames are background-subtracted as SPEC 1.3 requires;
* a few hot pixels (fixed across frames, ``MASK`` HDU nonzero there; their data are garbage on purpose).

Frames follow SPEC 1.3: a float32 primary image with the WCS, ``FRAMEID``, ``JD``, ``MJD-OBS``, ``GAIN``,
``RDNOISE`` in the header, an ``ERR`` image HDU (the true noise sigma, computed from the noiseless image)
and a ``MASK`` HDU. The catalog is a FITS table (``source_id``, ``ra``, ``dec``, ``flux``: a noisy estimate
of the mean flux) and the truth table has one row per (source, frame) with the true total flux and, for a
field that drifts (``drift``, ``scale_drift``), the true displacement ``dx``, ``dy`` (pixels) of the star from
where the frame's WCS puts it.

Units: ``pixscale`` in arcsec per pixel, ``fwhm`` (and every other PRF length) in pixels, fluxes in data
units (ADU). :func:`prf_density` and :func:`encircled_energy` give the true PRF so that tests can compute
encircled energies independently of the fitted model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import sparse

__all__ = [
    "encircled_energy",
    "make_wcs",
    "prf_density",
    "prf_design",
    "simulate_images",
]


def _moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha for a full width at half maximum ``fwhm``."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def prf_density(
    dx,
    dy,
    fwhm=2.5,
    beta=3.0,
    ellipticity=0.15,
    theta=30.0,
    wing_fraction=0.03,
    wing_fwhm=12.5,
    wing_beta=2.5,
    wing_offset=(0.0, 0.0),
):
    """True PRF surface density (per unit pixel area) at pixel offsets from the source centre.

    The profile is ``(1 - wing_fraction)`` x an elliptical Moffat plus ``wing_fraction`` x a circular,
    much wider Moffat centred ``wing_offset`` from the core (an offset wing makes the PRF asymmetric, as
    coma or a tilted detector does); it integrates to 1 over the plane.

    Parameters
    ----------
    dx, dy : array_like
        Offsets from the source centre along the pixel axes, in pixels (broadcast together).
    fwhm : float
        Geometric-mean FWHM of the core, in pixels.
    beta : float
        Moffat index of the core (> 1).
    ellipticity : float
        1 - b/a of the core, in [0, 1).
    theta : float
        Position angle of the core's major axis from the +x pixel axis, in degrees.
    wing_fraction : float
        Fraction of the flux in the wing, in [0, 1).
    wing_fwhm : float
        FWHM of the circular wing, in pixels.
    wing_beta : float
        Moffat index of the wing (> 1).
    wing_offset : tuple of float
        Centre of the wing relative to the core, (dx, dy) in pixels.

    Returns
    -------
    numpy.ndarray
        Density in units of flux fraction per pixel area.
    """
    dx = np.asarray(dx, dtype=float)
    dy = np.asarray(dy, dtype=float)
    alpha = _moffat_alpha(fwhm, beta)
    q = 1.0 - ellipticity
    ax, ay = alpha / np.sqrt(q), alpha * np.sqrt(q)
    th = np.deg2rad(theta)
    u = dx * np.cos(th) + dy * np.sin(th)
    v = -dx * np.sin(th) + dy * np.cos(th)
    core = (beta - 1.0) / (np.pi * ax * ay) * (1.0 + (u / ax) ** 2 + (v / ay) ** 2) ** (-beta)
    aw = _moffat_alpha(wing_fwhm, wing_beta)
    wx, wy = dx - wing_offset[0], dy - wing_offset[1]
    wing = (wing_beta - 1.0) / (np.pi * aw * aw) * (1.0 + (wx * wx + wy * wy) / aw**2) ** (-wing_beta)
    return (1.0 - wing_fraction) * core + wing_fraction * wing


def encircled_energy(radius, prf=None, pixel_integrated=True, n_r=1000, n_phi=360, nsub=5):
    """Fraction of the true PRF's flux inside a circle of ``radius`` pixels (polar quadrature).

    Parameters
    ----------
    radius : float
        Radius in pixels.
    prf : dict, optional
        Keyword arguments of :func:`prf_density` (the ``prf`` entry of :func:`simulate_images`' result).
    pixel_integrated : bool
        Integrate the PRF as the frames record it -- the density averaged over a pixel box centred on each
        point (``nsub`` x ``nsub`` samples), which is what a PRF model fitted to pixel values represents --
        rather than the density itself (the two differ by < 1e-4 beyond ~3 FWHM).
    n_r, n_phi : int
        Quadrature points in radius (midpoint rule) and angle.
    nsub : int
        Sub-samples per axis of the pixel box.

    Returns
    -------
    float
        The encircled energy, in [0, 1].
    """
    prf = dict(prf or {})
    dr = radius / n_r
    r = (np.arange(n_r) + 0.5) * dr
    phi = (np.arange(n_phi) + 0.5) * (2 * np.pi / n_phi)
    rr, pp = np.meshgrid(r, phi, indexing="ij")
    x, y = rr * np.cos(pp), rr * np.sin(pp)
    if pixel_integrated:
        sub = (np.arange(nsub) + 0.5) / nsub - 0.5
        dens = np.zeros_like(rr)
        for sx in sub:
            for sy in sub:
                dens += prf_density(x + sx, y + sy, **prf)
        dens /= nsub * nsub
    else:
        dens = prf_density(x, y, **prf)
    return float(np.sum(dens * rr) * dr * (2 * np.pi / n_phi))


def prf_design(x, y, shape, prf=None, stamp_radius=None, nsub=5):
    """Pixel-integrated PRF of every source on a frame, as a sparse (npixels x nsources) matrix.

    Each source's PRF is integrated over every pixel of a square stamp by ``nsub`` x ``nsub`` sub-pixel
    sampling; pixels outside the frame are dropped (their flux is lost, as on a real detector).

    Parameters
    ----------
    x, y : array_like
        Source centres in 0-based pixel coordinates (x along columns, y along rows).
    shape : tuple of int
        Frame shape (ny, nx).
    prf : dict, optional
        Keyword arguments of :func:`prf_density`.
    stamp_radius : int, optional
        Half-size of the stamp in pixels; default: large enough for the wing (3 wing FWHM, at least
        6 core FWHM).
    nsub : int
        Sub-pixel samples per axis.

    Returns
    -------
    scipy.sparse.csc_array
        ``(ny*nx, nsources)``; ``image.ravel() = design @ flux``.
    """
    prf = dict(prf or {})
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    ny, nx = shape
    if stamp_radius is None:
        fwhm = prf.get("fwhm", 2.5)
        stamp_radius = int(np.ceil(max(6 * fwhm, 3 * prf.get("wing_fwhm", 12.5))))
    off = np.arange(-stamp_radius, stamp_radius + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    sub = (np.arange(nsub) + 0.5) / nsub - 0.5
    sy, sx = np.meshgrid(sub, sub, indexing="ij")
    sy, sx = sy.ravel(), sx.ravel()
    rows, cols, vals = [], [], []
    chunk = max(1, 2_000_000 // (oy.size * sx.size))
    for start in range(0, x.size, chunk):  # chunks of sources bound memory; each chunk is vectorised
        xs, ys = x[start : start + chunk], y[start : start + chunk]
        px = np.rint(xs)[:, None] + ox[None, :]
        py = np.rint(ys)[:, None] + oy[None, :]
        dx = (px - xs[:, None])[..., None] + sx
        dy = (py - ys[:, None])[..., None] + sy
        val = prf_density(dx, dy, **prf).mean(axis=-1)
        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        src = np.broadcast_to(np.arange(start, start + xs.size)[:, None], px.shape)
        rows.append((py * nx + px)[inside].astype(np.int64))
        cols.append(src[inside])
        vals.append(val[inside])
    return sparse.csc_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(ny * nx, x.size)
    )


def make_wcs(size, pixscale=0.11, ra=150.0, dec=70.0, rotation=25.0, crpix_shift=(0.0, 0.0)):
    """A TAN WCS for a square ``size`` x ``size`` frame (RA increasing to the left, rotated).

    Parameters
    ----------
    size : int or tuple of int
        Frame size (or (ny, nx)).
    pixscale : float
        Pixel scale in arcsec per pixel.
    ra, dec : float
        Field centre in degrees.
    rotation : float
        Rotation of the pixel grid on the sky, in degrees.
    crpix_shift : tuple of float
        Shift of the reference pixel (pointing jitter), in pixels.

    Returns
    -------
    astropy.wcs.WCS
    """
    ny, nx = (size, size) if np.isscalar(size) else size
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2.0 + crpix_shift[0], (ny + 1) / 2.0 + crpix_shift[1]]
    s = pixscale / 3600.0
    c, sn = np.cos(np.deg2rad(rotation)), np.sin(np.deg2rad(rotation))
    w.wcs.cd = np.array([[-s * c, s * sn], [s * sn, s * c]])
    w.wcs.set()
    return w


def _place_sources(rng, n_stars, size, fwhm, n_pairs, n_edge, min_separation, margin):
    """Pixel positions: pairs first, then edge stars, then the rest with a minimum separation."""
    xs, ys, pair_id, edge = [], [], [], []

    def ok(x, y, sep):
        if not xs:
            return True
        d2 = (np.asarray(xs) - x) ** 2 + (np.asarray(ys) - y) ** 2
        return bool(np.all(d2 >= sep * sep))

    def draw(sep, lo=margin, hi=None):
        hi = size - 1 - margin if hi is None else hi
        for _ in range(2000):
            x, y = rng.uniform(lo, hi, 2)
            if ok(x, y, sep):
                return x, y
        return rng.uniform(lo, hi, 2)  # crowded beyond the requested separation: give up gracefully

    for p in range(n_pairs):
        x, y = draw(min_separation + 2 * fwhm)
        d = rng.uniform(1.0, 2.0) * fwhm
        a = rng.uniform(0, 2 * np.pi)
        xs += [x, x + d * np.cos(a)]
        ys += [y, y + d * np.sin(a)]
        pair_id += [p, p]
        edge += [False, False]
    # Edge stars: one centred just inside the frame, one centred outside (less than half its PRF lands
    # on the frame), alternating between the four sides.
    for e in range(n_edge):
        along = rng.uniform(0.3, 0.7) * (size - 1)
        across = 1.0 if e % 2 == 0 else -2.5 * fwhm
        side = (e // 2) % 4
        far = size - 1 - across
        x, y = [(across, along), (along, across), (far, along), (along, far)][side]
        xs.append(x)
        ys.append(y)
        pair_id.append(-1)
        edge.append(True)
    while len(xs) < n_stars:
        x, y = draw(min_separation)
        xs.append(x)
        ys.append(y)
        pair_id.append(-1)
        edge.append(False)
    return np.array(xs), np.array(ys), np.array(pair_id), np.array(edge)


def simulate_images(
    outdir,
    n_frames=20,
    n_stars=60,
    size=64,
    pixscale=0.11,
    seed=0,
    dec=70.0,
    ra=150.0,
    fwhm=2.5,
    beta=3.0,
    ellipticity=0.15,
    theta=30.0,
    wing_fraction=0.03,
    wing_fwhm=None,
    wing_beta=2.5,
    wing_offset=(0.0, 0.0),
    flux_range=(2e3, 2e5),
    n_pairs=3,
    n_variables=3,
    n_edge=0,
    min_separation=0.0,
    margin=None,
    catalog_scatter=0.15,
    gain=2.0,
    rdnoise=3.0,
    sky=20.0,
    n_bad_pixels=5,
    rotation=25.0,
    jitter=0.0,
    drift=0.0,
    scale_drift=0.0,
    drift_angle=30.0,
    focus_change=0.0,
    nsub=5,
    first_id=1_000_000_000_000,
    time0=2460000.5,
    cadence=0.02,
    dtype=np.float32,
):
    """Write simulated background-subtracted frames, a catalog and a truth table (SPEC 1.3).

    Parameters
    ----------
    outdir : str or os.PathLike
        Output directory (created); frames go to ``outdir/frames/``.
    n_frames, n_stars, size : int
        Number of frames, of stars (pairs and edge stars included), frame size in pixels.
    pixscale : float
        Pixel scale, arcsec per pixel.
    seed : int
        Seed of every random draw (positions, fluxes, noise).
    dec, ra : float
        Field centre in degrees (high declination by default, so ``cos(dec)`` matters).
    fwhm, beta, ellipticity, theta : float
        Elliptical Moffat core (FWHM in pixels, position angle in degrees from +x).
    wing_fraction, wing_fwhm, wing_beta : float
        Faint wide circular Moffat wing (flux fraction, FWHM in pixels -- default 5 x ``fwhm`` --, index).
    wing_offset : tuple of float
        Offset of the wing's centre from the core's, (dx, dy) in pixels (an asymmetric PRF).
    flux_range : tuple of float
        Min and max mean flux (data units), drawn log-uniform.
    n_pairs : int
        Crowded pairs, at 1-2 FWHM separation.
    n_variables : int
        Variable stars (sinusoids of 10-40 % amplitude), chosen among stars that are not in pairs.
    n_edge : int
        Stars on the frame edge: even ones centred just inside, odd ones centred 2.5 FWHM outside.
    min_separation : float
        Minimum separation in pixels between stars that are not in the same pair (best effort).
    margin : float, optional
        Distance of non-edge stars from the frame edge, in pixels (default 2 FWHM).
    catalog_scatter : float
        Relative (log-normal) scatter of the catalog flux estimate about the true mean flux.
    gain, rdnoise, sky : float
        ``GAIN`` (e-/data unit), ``RDNOISE`` (data units) and the sky level (data units, subtracted).
    n_bad_pixels : int
        Hot pixels (the same in every frame), flagged in the ``MASK`` HDU; their data are 1e5.
    rotation : float
        Rotation of the pixel grid on the sky, degrees.
    jitter : float
        RMS pointing jitter in pixels; 0 keeps one WCS for every frame, otherwise each frame has its own
        ``CRPIX`` (and the stars move on the detector).
    drift : float
        Pointing drift not in the WCS (pixels over the campaign): every star moves by
        ``drift * tau**2`` along ``drift_angle`` (degrees from +x), ``tau = t / (n_frames - 1)`` from 0 at
        the first frame to 1 at the last (a slow drift that accelerates, like a spacecraft's).
    scale_drift : float
        Plate-scale change not in the WCS over the campaign (a fraction): star positions are scaled
        about the frame centre by ``1 + scale_drift * tau`` (velocity aberration, focus).
    drift_angle : float
        Direction of ``drift``, degrees from +x.
    focus_change : float
        A slow focus change (a fraction): the core's FWHM is ``fwhm * (1 + focus_change * tau)`` in frame
        ``t`` (``tau`` as for ``drift``); the wing is unchanged. The PRF's shape then changes over the
        campaign, which no transform of the positions can follow (the time model's perturbation can).
    nsub : int
        Sub-pixel samples per axis for the pixel integration.
    first_id : int
        ``source_id`` of the first star (ids are consecutive int64).
    time0, cadence : float
        ``JD`` of the first frame and the cadence in days.
    dtype : numpy dtype
        Image data type (float32 or float64).

    Returns
    -------
    dict
        ``paths`` (list of frame paths), ``catalog`` (path), ``truth`` (path) and ``prf`` (the keyword
        arguments of :func:`prf_density` describing the true PRF, in pixels).
    """
    if n_frames < 1 or n_stars < 1 or size < 8:
        raise ValueError("simulate_images needs n_frames >= 1, n_stars >= 1 and size >= 8")
    if 2 * n_pairs + n_edge > n_stars:
        raise ValueError("n_stars must be at least 2 * n_pairs + n_edge")
    outdir = Path(outdir)
    (outdir / "frames").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wing_fwhm = 5.0 * fwhm if wing_fwhm is None else wing_fwhm
    prf = dict(
        fwhm=fwhm,
        beta=beta,
        ellipticity=ellipticity,
        theta=theta,
        wing_fraction=wing_fraction,
        wing_fwhm=wing_fwhm,
        wing_beta=wing_beta,
        wing_offset=(float(wing_offset[0]), float(wing_offset[1])),
    )
    margin = 2.0 * fwhm if margin is None else margin

    x, y, pair_id, edge = _place_sources(rng, n_stars, size, fwhm, n_pairs, n_edge, min_separation, margin)
    source_id = first_id + np.arange(n_stars, dtype=np.int64)
    mean_flux = np.exp(rng.uniform(np.log(flux_range[0]), np.log(flux_range[1]), n_stars))
    times = time0 + cadence * np.arange(n_frames)
    flux = np.repeat(mean_flux[None, :], n_frames, axis=0)
    variable = np.zeros(n_stars, bool)
    candidates = np.flatnonzero((pair_id < 0) & ~edge)
    if n_variables:
        var = rng.choice(candidates, size=min(n_variables, candidates.size), replace=False)
        variable[var] = True
        amp = rng.uniform(0.1, 0.4, var.size)
        period = rng.uniform(0.3, 1.0, var.size) * cadence * max(n_frames, 2)
        phase = rng.uniform(0, 2 * np.pi, var.size)
        flux[:, var] *= 1.0 + amp * np.sin(2 * np.pi * (times[:, None] - time0) / period + phase)

    wcs0 = make_wcs(size, pixscale, ra, dec, rotation)
    sra, sdec = wcs0.all_pix2world(x, y, 0)
    cat_flux = mean_flux * np.exp(catalog_scatter * rng.standard_normal(n_stars))
    bad = rng.choice(size * size, size=min(n_bad_pixels, size * size), replace=False)
    mask = np.zeros(size * size, np.uint8)
    mask[bad] = 1
    mask = mask.reshape(size, size)

    design = None
    paths = []
    moving = drift != 0.0 or scale_drift != 0.0
    fwhm_t = fwhm * (1.0 + focus_change * np.arange(n_frames) / max(n_frames - 1, 1))
    centre = (size - 1) / 2.0
    drift_dx = np.zeros((n_frames, n_stars))  # true position - the frame WCS's position (pixels)
    drift_dy = np.zeros((n_frames, n_stars))
    for t in range(n_frames):
        if jitter > 0 or moving or focus_change != 0.0 or design is None:
            shift = tuple(rng.normal(0.0, jitter, 2)) if jitter > 0 else (0.0, 0.0)
            wcs_t = make_wcs(size, pixscale, ra, dec, rotation, crpix_shift=shift)
            xt, yt = wcs_t.all_world2pix(sra, sdec, 0)
            if moving:
                tau = t / (n_frames - 1) if n_frames > 1 else 0.0
                ang = np.deg2rad(drift_angle)
                drift_dx[t] = drift * tau**2 * np.cos(ang) + scale_drift * tau * (xt - centre)
                drift_dy[t] = drift * tau**2 * np.sin(ang) + scale_drift * tau * (yt - centre)
            prf_t = dict(prf, fwhm=float(fwhm_t[t]))
            design = prf_design(xt + drift_dx[t], yt + drift_dy[t], (size, size), prf_t, nsub=nsub)
        model = (design @ flux[t]).reshape(size, size)
        expected = np.maximum(model + sky, 0.0)
        data = rng.poisson(expected * gain) / gain - sky + rng.normal(0.0, rdnoise, model.shape)
        err = np.sqrt(expected / gain + rdnoise**2)
        data[mask > 0] = 1e5
        frame_id = f"sim{t:04d}"
        hdr = wcs_t.to_header()
        hdr["FRAMEID"] = (frame_id, "frame identifier")
        hdr["JD"] = (times[t], "Julian date, mid-exposure")
        hdr["MJD-OBS"] = (times[t] - 2400000.5, "modified Julian date, mid-exposure")
        hdr["GAIN"] = (gain, "e-/ADU")
        hdr["RDNOISE"] = (rdnoise, "read noise, ADU")
        hdr["BUNIT"] = "adu"
        hdr["SKYSUB"] = (sky, "sky level subtracted, ADU")
        hdus = fits.HDUList(
            [
                fits.PrimaryHDU(data.astype(dtype), header=hdr),
                fits.ImageHDU(err.astype(dtype), name="ERR"),
                fits.ImageHDU(mask, name="MASK"),
            ]
        )
        path = outdir / "frames" / f"{frame_id}.fits"
        hdus.writeto(path, overwrite=True)
        paths.append(os.fspath(path))

    catalog = Table({"source_id": source_id, "ra": sra, "dec": sdec, "flux": cat_flux})
    catalog.meta["PIXSCALE"] = pixscale
    cat_path = outdir / "catalog.fits"
    catalog.write(cat_path, overwrite=True)

    truth = Table(
        {
            "source_id": np.tile(source_id, n_frames),
            "frame_id": np.repeat([f"sim{t:04d}" for t in range(n_frames)], n_stars),
            "flux": flux.ravel(),
            "mean_flux": np.tile(mean_flux, n_frames),
            "x": np.tile(x, n_frames),
            "y": np.tile(y, n_frames),
            "dx": drift_dx.ravel(),
            "dy": drift_dy.ravel(),
            "fwhm": np.repeat(fwhm_t, n_stars),
            "ra": np.tile(sra, n_frames),
            "dec": np.tile(sdec, n_frames),
            "pair_id": np.tile(pair_id, n_frames),
            "edge": np.tile(edge, n_frames),
            "variable": np.tile(variable, n_frames),
        }
    )
    truth.meta.update(
        {
            "PIXSCALE": pixscale,
            "FWHM": fwhm,
            "BETA": beta,
            "ELLIP": ellipticity,
            "THETA": theta,
            "WINGFRAC": wing_fraction,
            "WINGFWHM": wing_fwhm,
            "WINGBETA": wing_beta,
            "WINGDX": prf["wing_offset"][0],
            "WINGDY": prf["wing_offset"][1],
            "GAIN": gain,
            "RDNOISE": rdnoise,
            "SKY": sky,
            "JITTER": jitter,
            "DRIFT": drift,
            "SCALEDRF": scale_drift,
            "DRIFTANG": drift_angle,
            "FOCUS": focus_change,
        }
    )
    truth_path = outdir / "truth.fits"
    truth.write(truth_path, overwrite=True)
    return {"paths": paths, "catalog": os.fspath(cat_path), "truth": os.fspath(truth_path), "prf": prf}
