"""The Kepler FFI cutout (``tests/data/kepler``) made ready for ``photref prf`` as a user would, and the
aperture photometry its fitted fluxes are checked against.

The cutout is raw in one way that matters: its rows < 20 and columns < 12 are collateral pixels, its
background (~150 e-/s) is not subtracted, one star saturates and bleeds along its columns, it has no error
image and no catalog. :func:`prepare_kepler_field` writes a SPEC 1.3 frame (background-subtracted data,
``ERR`` from the photon and read noise, ``MASK`` of the collateral, saturated and bleed pixels,
``FRAMEID``, ``JD``) and a SPEC 1.2 catalog from a DAOPHOT-style star finder (photutils' ``DAOStarFinder``)
with ra/dec from the frame's WCS and an aperture flux as the flux estimate. :func:`aperture_check`
compares fitted fluxes with aperture fluxes corrected to the PRF's disc, measured on the data (a curve
of growth of isolated bright stars), so the check does not lean on the PRF model it checks.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import SigmaClip
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

__all__ = [
    "KEPLER_DATA",
    "CORRECTION_RADIUS",
    "KEPLER_PIXSCALE",
    "aperture_check",
    "aperture_fluxes",
    "prepare_kepler_field",
]

#: The cutout as copied into the test data (provenance: ``tests/data/kepler/README.md``).
KEPLER_DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "kepler" / "kplr-ffi_ch01_test.fits"
#: Arcsec per pixel of Kepler's detector (the WCS gives ~3.98).
KEPLER_PIXSCALE = 4.0
#: First science row and column of the cutout (smaller ones are collateral: README).
SCIENCE_ROW, SCIENCE_COLUMN = 20, 12
#: e-/s above which a pixel is saturated (the README: ~1.2e5), and how far around a saturated pixel the
#: mask reaches (pixels) and along its column (rows): the bleed.
SATURATION, SATURATION_GROW, BLEED_ROWS = 1.0e5, 2, 20
#: PRF FWHM (pixels) for the star finder and its threshold (sigma of the background).
FINDER_FWHM, FINDER_SIGMA = 1.6, 5.0
#: Radius (pixels) of the aperture of the flux estimate and of the check.
APERTURE = 3.0
#: Radius (pixels) the check's aperture correction takes the 3-pixel flux to.
CORRECTION_RADIUS = 5.0


def prepare_kepler_field(outdir, source=KEPLER_DATA) -> dict:
    """Write the cutout as a SPEC 1.3 frame and a catalog of the stars found on it.

    Parameters
    ----------
    outdir : str or os.PathLike
        Created if missing.
    source : str or os.PathLike
        The Kepler FFI cutout (HDU 1: e-/s with a celestial WCS).

    Returns
    -------
    dict
        ``image`` and ``catalog`` (paths), ``n_sources``, ``saturated`` (source ids of the stars on
        saturated pixels) and ``background`` (the median background subtracted, e-/s).
    """
    from photutils.aperture import CircularAperture, aperture_photometry
    from photutils.background import Background2D, MedianBackground
    from photutils.detection import DAOStarFinder

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with fits.open(source) as hdul:
        header = hdul[1].header.copy()
        raw = np.asarray(hdul[1].data, dtype=float)
    ny, nx = raw.shape
    bad = np.zeros(raw.shape, bool)
    bad[:SCIENCE_ROW] = True
    bad[:, :SCIENCE_COLUMN] = True
    bad |= ~np.isfinite(raw)
    saturated = raw > SATURATION
    bad |= _saturation_mask(saturated)

    bkg = Background2D(
        raw,
        box_size=25,
        # The clipping of a crowded field's stars takes > 10 % of every box: photutils' default kept none.
        exclude_percentile=50.0,
        filter_size=3,
        mask=bad,
        sigma_clip=SigmaClip(sigma=3.0),
        bkg_estimator=MedianBackground(),
    )
    data = raw - bkg.background
    # Error in e-/s: the stars' photons over the exposure and the background's measured scatter (its
    # photons and read noise alone give 0.9 e-/s; the measured rms, 5-7 e-/s, holds what they leave out:
    # faint unresolved stars, smear, the calibration's residue).
    exposure = float(header["EXPOSURE"]) * 86400.0
    err = np.sqrt(np.maximum(data, 0.0) / exposure + bkg.background_rms**2)

    with warnings.catch_warnings():  # astropy's "datfix" note on the header's DATE-END: harmless
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header)
    finder = DAOStarFinder(fwhm=FINDER_FWHM, threshold=FINDER_SIGMA * float(np.median(bkg.background_rms)))
    found = finder(np.where(bad, 0.0, data), mask=bad)
    x, y = np.asarray(found["xcentroid"]), np.asarray(found["ycentroid"])
    # Stars on the saturated core: the finder sees the masked core as a hole; add them at the peak.
    x, y = _with_saturated(x, y, saturated)
    ra, dec = wcs.all_pix2world(x, y, 0)
    apertures = CircularAperture(np.column_stack([x, y]), r=APERTURE)
    flux = np.asarray(aperture_photometry(np.where(bad, 0.0, data), apertures)["aperture_sum"])
    on_saturated = np.array([saturated[_near(yi, xi, ny, nx)].any() for xi, yi in zip(x, y, strict=True)])
    catalog = Table()
    catalog["source_id"] = np.arange(1, x.size + 1, dtype=np.int64)
    catalog["ra"], catalog["dec"] = ra, dec
    catalog["flux"] = np.maximum(flux, 1.0)  # the mask seed: a flux estimate, never <= 0
    catalog["x"], catalog["y"] = x, y

    frame = fits.PrimaryHDU(data.astype(np.float32), header=wcs.to_header(relax=True))
    frame.header["FRAMEID"] = "kplr-ffi-ch01"
    frame.header["DATE-OBS"] = header["DATE-OBS"].rstrip("Z")
    frame.header["JD"] = 0.5 * (header["MJDSTART"] + header["MJDEND"]) + 2400000.5
    frame.header["BUNIT"] = "electrons/s"
    frame.header["BKGSUB"] = (float(np.median(bkg.background)), "median background subtracted [e-/s]")
    hdus = fits.HDUList(
        [
            frame,
            fits.ImageHDU(err.astype(np.float32), name="ERR"),
            fits.ImageHDU(bad.astype(np.uint8), name="MASK"),
        ]
    )
    image = outdir / "kplr-ffi-ch01.fits"
    hdus.writeto(image, overwrite=True)
    catalog_path = outdir / "kepler-sources.fits"
    catalog.write(catalog_path, overwrite=True)
    return {
        "image": os.fspath(image),
        "catalog": os.fspath(catalog_path),
        "n_sources": int(x.size),
        "saturated": catalog["source_id"][on_saturated].tolist(),
        "background": float(np.median(bkg.background)),
    }


def _saturation_mask(saturated):
    """Saturated pixels, grown by :data:`SATURATION_GROW` pixels and along their columns by
    :data:`BLEED_ROWS` rows (the bleed trail)."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(saturated, iterations=SATURATION_GROW)
    bleed = ndimage.binary_dilation(saturated, structure=np.ones((2 * BLEED_ROWS + 1, 3), bool))
    return grown | bleed


def _with_saturated(x, y, saturated):
    """The found positions plus one at the brightest saturated pixel of each saturated star the finder
    missed (none found within 3 pixels)."""
    from scipy import ndimage

    labels, n = ndimage.label(saturated)
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        cy, cx = ys.mean(), xs.mean()
        if x.size == 0 or np.min(np.hypot(x - cx, y - cy)) > 3.0:
            x, y = np.append(x, cx), np.append(y, cy)
    return x, y


def _near(y, x, ny, nx, r=2):
    """Index of the pixels within ``r`` of (x, y)."""
    i, j = int(round(y)), int(round(x))
    return slice(max(i - r, 0), min(i + r + 1, ny)), slice(max(j - r, 0), min(j + r + 1, nx))


def aperture_fluxes(image, x, y, radius):
    """Circular aperture sums of a :func:`prepare_kepler_field` frame (masked pixels as 0).

    Returns
    -------
    tuple of numpy.ndarray
        The sums, the fraction of each aperture on good pixels, the variance of the sums (``ERR``).
    """
    from photutils.aperture import CircularAperture, aperture_photometry

    with fits.open(image) as hdul:
        data = np.asarray(hdul[0].data, dtype=float)
        var = np.asarray(hdul["ERR"].data, dtype=float) ** 2
        bad = np.asarray(hdul["MASK"].data) != 0
    apertures = CircularAperture(np.column_stack([x, y]), r=radius)

    def total(values):
        return np.asarray(aperture_photometry(values, apertures)["aperture_sum"])

    area = total(np.ones_like(data))
    return total(np.where(bad, 0.0, data)), total((~bad).astype(float)) / area, total(np.where(bad, 0.0, var))


def aperture_check(image, catalog, fluxes: Table, radius: float = CORRECTION_RADIUS) -> dict:
    """Fitted fluxes over aperture-corrected 3-pixel aperture fluxes, for isolated bright stars.

    The aperture correction takes the 3-pixel flux to the flux within ``radius`` pixels: the median ratio
    of the two sums over the stars used (a curve of growth measured on the data, not on the PRF model).
    A fitted flux is the flux inside the PRF's ``rmax`` (SPEC 6), close to the total: light beyond
    ``radius`` makes the ratio a little over 1 (~2 % for Kepler's PRF beyond 5 pixels).

    Parameters
    ----------
    image, catalog : str
        :func:`prepare_kepler_field`'s frame and catalog.
    fluxes : astropy.table.Table
        ``source_id`` and ``flux`` of the frame (a flux table).
    radius : float
        Pixels.

    Returns
    -------
    dict
        ``median_ratio``, ``n_stars``, ``aperture_correction`` and ``ratios`` (per star used); stars
        used: no catalog neighbour brighter than 1 % of the star within ``radius`` + 3 pixels, every
        pixel of both apertures good, signal-to-noise > 100 in the 3-pixel aperture, a finite fit.
    """
    cat = Table.read(catalog)
    x, y = np.asarray(cat["x"]), np.asarray(cat["y"])
    by_id = {int(s): i for i, s in enumerate(fluxes["source_id"])}
    fitted = np.asarray(fluxes["flux"], dtype=float)[[by_id[int(s)] for s in cat["source_id"]]]
    ap3, good3, var3 = aperture_fluxes(image, x, y, APERTURE)
    apr, goodr, _ = aperture_fluxes(image, x, y, radius)
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    seed = np.asarray(cat["flux"], dtype=float)
    contaminated = ((d < radius + APERTURE) & (seed[None, :] > 0.01 * seed[:, None])).any(axis=1)
    use = ~contaminated & (good3 == 1.0) & (goodr == 1.0) & (ap3 > 100 * np.sqrt(var3)) & np.isfinite(fitted)
    if not use.any():
        return {"median_ratio": float("nan"), "n_stars": 0, "aperture_correction": float("nan"), "ratios": []}
    correction = float(np.median(apr[use] / ap3[use]))
    ratios = fitted[use] / (ap3[use] * correction)
    return {
        "median_ratio": float(np.median(ratios)),
        "n_stars": int(use.sum()),
        "aperture_correction": correction,
        "ratios": ratios,
    }
