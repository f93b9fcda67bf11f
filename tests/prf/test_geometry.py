"""photref_core.prf.geometry: against brute force, and near the pole."""

from __future__ import annotations

import numpy as np
from prfutil import MAIN_PARAMS, setup_field

from photref_core.prf.geometry import build_geometry


def test_geometry_matches_brute_force():
    from photref_core.simulate.images import make_wcs

    wcs = make_wcs((40, 50), 0.5, 10.0, 60.0, 33.0)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-3, 52, 25), rng.uniform(-3, 42, 25)
    ra, dec = wcs.all_pix2world(x, y, 0)
    g = build_geometry(wcs, (40, 50), ra, dec, 4.0)
    yy, xx = np.mgrid[0:40, 0:50]
    pra, pdec = wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    for i in range(25):  # the slow, obvious way: every pixel, exact angular distance
        a0, d0 = np.deg2rad([ra[i], dec[i]])
        a1, d1 = np.deg2rad(pra), np.deg2rad(pdec)
        hav = np.sin((d1 - d0) / 2) ** 2 + np.cos(d0) * np.cos(d1) * np.sin((a1 - a0) / 2) ** 2
        sep = np.rad2deg(2 * np.arcsin(np.sqrt(hav))) * 3600  # haversine: exact at small angles
        want = np.flatnonzero(sep <= 4.0)
        got = g.pix[g.indptr[i] : g.indptr[i + 1]]
        np.testing.assert_array_equal(np.sort(got), want)
        np.testing.assert_allclose(g.r[g.indptr[i] : g.indptr[i + 1]], sep[got], rtol=1e-6)


def test_high_declination_geometry_and_fluxes(tmp_path):
    """cos(dec) is applied: the same pixels at dec 0, 70 and 85 give the same geometry and fluxes."""
    sim_kw = dict(n_frames=4, n_stars=20, size=160, pixscale=0.11, seed=7, min_separation=20)
    fluxes = {}
    for dec in (0.0, 70.0, 85.0):
        f = setup_field(tmp_path / f"dec{dec:g}", dict(sim_kw, dec=dec), MAIN_PARAMS)
        g = f["model"].geometry()
        # Offsets on the tangent plane are the pixel offsets times the pixel scale (a square grid).
        dx = (g.pix % 160) - g.xpix[g.src]
        dy = (g.pix // 160) - g.ypix[g.src]
        np.testing.assert_allclose(g.r, 0.11 * np.hypot(dx, dy), rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(g.area, 0.11**2, rtol=1e-5)
        fluxes[dec] = f["res"].flux
        if dec == 70.0:
            # Without cos(dec) the RA offsets would be stretched by 1/cos(70 deg) = 2.9.
            naive = (f["cat"]["ra"][1] - f["cat"]["ra"][0]) * 3600
            true_xi = (f["cat"]["ra"][1] - f["cat"]["ra"][0]) * 3600 * np.cos(np.deg2rad(70.0))
            assert abs(naive) > 2.5 * abs(true_xi)
    np.testing.assert_allclose(fluxes[70.0], fluxes[0.0], rtol=1e-4, equal_nan=True)
    np.testing.assert_allclose(fluxes[85.0], fluxes[0.0], rtol=1e-4, equal_nan=True)
