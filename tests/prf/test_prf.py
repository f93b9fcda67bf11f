"""PRF photometry (SPEC 6) on simulated fields with a known truth (photref_core.simulate_images).

The reference for a fitted flux is the true total flux times the true PRF's encircled energy inside
``rmax`` (computed here by polar quadrature of the true PRF, independently of the model): SPEC 6 defines
the fitted weight as the source's flux inside ``rmax``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from photref_core.errors import BadInputError
from photref_core.prf import solver as prf_solver
from photref_core.prf.geometry import build_geometry
from photref_core.prf.model import PRFModel
from photref_core.prf.parameters import PRFParameters
from photref_core.prf.shape import ShapeModel
from photref_core.prf.solver import FLAG_LOW_COVERAGE
from photref_core.simulate.fields import load_frames
from photref_core.simulate.images import encircled_energy, prf_density, simulate_images

# The main field: Roman-like 0.11"/pix, FWHM 2.5 px, at dec +70. Radii are passed in arcsec; rmax=1.1"
# (10 px = 4 FWHM) keeps 60 stars in 300x300 px mostly non-overlapping, so "isolated" stars exist.
MAIN = dict(n_frames=20, n_stars=60, size=300, pixscale=0.11, seed=1, min_separation=24.0, n_edge=2)
MAIN_PARAMS = dict(rmax=1.1, sparse_dist_lim=2.0)


def setup_field(tmp, sim_kw, params_kw, per_frame_wcs=False):
    sim = simulate_images(tmp, **sim_kw)
    flux, err, mask, wcs = load_frames(sim["paths"])
    cat = Table.read(sim["catalog"])
    truth = Table.read(sim["truth"])
    params = PRFParameters(**params_kw)
    w = wcs if per_frame_wcs else wcs[0]
    model = PRFModel.from_catalog(flux, err, w, cat, params=params, mask=mask)
    res = model.fit(flux, err, mask=mask, wcs=w)
    nt, ns = res.flux.shape
    pixscale = sim_kw["pixscale"]
    ee = encircled_energy(params.rmax / pixscale, sim["prf"])
    first = truth[:ns]
    return dict(
        sim=sim,
        flux=flux,
        err=err,
        mask=mask,
        wcs=wcs,
        cat=cat,
        model=model,
        res=res,
        params=params,
        true=np.array(truth["flux"]).reshape(nt, ns),
        ee=ee,
        pair=np.array(first["pair_id"]),
        edge=np.array(first["edge"]),
        x=np.array(first["x"]),
        y=np.array(first["y"]),
        variable=np.array(first["variable"]),
    )


def isolated(f):
    plan = f["model"]._plan()
    return (plan.group_sizes[plan.labels] == 1) & (f["pair"] < 0) & ~f["edge"]


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    return setup_field(tmp_path_factory.mktemp("main"), MAIN, MAIN_PARAMS)


# ---------------------------------------------------------------------------------------------------
def test_simulated_frames_follow_spec(main):
    with fits.open(main["sim"]["paths"][0]) as h:
        hdr = h[0].header
        for key in ("FRAMEID", "JD", "MJD-OBS", "GAIN", "RDNOISE", "CTYPE1", "CRVAL2"):
            assert key in hdr
        assert h["ERR"].data.shape == h[0].data.shape
        assert h["MASK"].data.sum() > 0
    cat = main["cat"]
    assert cat["source_id"].dtype.kind == "i" and cat["source_id"].dtype.itemsize == 8
    assert {"ra", "dec", "flux"} <= set(cat.colnames)
    # Catalog fluxes are noisy estimates (~15 %), fluxes span two decades, the PRF is not a Gaussian:
    # its encircled energy at 3 FWHM is well below a Gaussian's (1 - 2^-36).
    mean_true = main["true"].mean(axis=0)
    scatter = np.std(np.log(np.asarray(cat["flux"]) / mean_true))
    assert 0.08 < scatter < 0.25
    assert mean_true.max() / mean_true.min() > 30
    assert encircled_energy(3 * 2.5, main["sim"]["prf"]) < 0.98
    assert main["variable"].sum() == 3


def test_isolated_star_fluxes_match_truth(main):
    iso = isolated(main)
    assert iso.sum() >= 30
    ref = main["true"] * main["ee"]
    rel = (main["res"].flux - ref)[:, iso] / ref[:, iso]
    chi = ((main["res"].flux - ref) / main["res"].flux_err)[:, iso]
    assert np.all(np.isfinite(rel))
    assert np.median(np.abs(rel)) < 0.01
    assert abs(np.mean(rel)) < 0.003
    assert 0.8 < np.std(chi) < 1.25
    # Variable stars are followed (the prior, centred on the mean flux, is wide enough).
    var = main["variable"] & iso
    chi_var = ((main["res"].flux - ref) / main["res"].flux_err)[:, var]
    assert np.all(np.abs(np.mean(chi_var, axis=0)) < 1.0)
    assert np.all(main["true"][:, var].std(axis=0) / main["true"][:, var].mean(axis=0) > 0.05)


def test_crowded_pairs_unbiased(main):
    ref = main["true"] * main["ee"]
    members = np.flatnonzero(main["pair"] >= 0)
    assert members.size == 6
    plan = main["model"]._plan()
    for i in members:  # each pair is one group of two overlapping sources, solved jointly
        assert plan.group_sizes[plan.labels[i]] >= 2
        d = main["res"].flux[:, i] - ref[:, i]
        n = d.size
        assert abs(d.mean()) < 3 * d.std(ddof=1) / np.sqrt(n), i
        chi = d / main["res"].flux_err[:, i]
        assert 0.5 < chi.std() < 1.6


def test_normalisation_is_encircled_energy(main):
    """Row sums of mean_model, the model's own encircled energy and the true PRF's, independently."""
    m, iso = main["model"], isolated(main)
    n = main["flux"].shape[-1]
    rpix = m.params.rmax / 0.11
    lo, hi = np.minimum(main["x"], main["y"]), np.maximum(main["x"], main["y"])
    inner = iso & (lo > rpix + 1) & (hi < n - rpix - 2)
    assert inner.sum() >= 20
    rows = np.asarray(m.mean_model.sum(axis=1)).ravel()
    # An isolated star fully on the frame: its row sums to ~1 (= its flux inside rmax, by construction).
    np.testing.assert_allclose(rows[inner], 1.0, atol=2e-3)
    assert m.shape.encircled_energy(m.params.rmax) == pytest.approx(1.0, abs=1e-9)
    # The shape matches the true PRF: encircled energies relative to rmax agree at several radii.
    ee_rmax = main["ee"]
    prf = main["sim"]["prf"]
    for r in (0.4, 0.6, 0.8):
        want = encircled_energy(r / 0.11, prf) / ee_rmax
        assert m.shape.encircled_energy(r) == pytest.approx(want, abs=1.5e-3)
    # Stars on the frame edge: the model fraction on the frame (sub-pixel sampled metric and row sum)
    # equals the true PRF's fraction of its rmax-flux that lands on the frame (fine-grid quadrature).
    metrics = m.get_psf_metrics()
    assert metrics.perturbed_ratio_mean is None and metrics.perturbed_std is None
    np.testing.assert_allclose(metrics.source_psf_fraction[inner], 1.0, atol=5e-4)
    g = np.linspace(-rpix, rpix, 1201)
    gx, gy = np.meshgrid(g, g)
    disc = np.hypot(gx, gy) <= rpix
    dens = prf_density(gx, gy, **prf) * disc
    for i in np.flatnonzero(main["edge"]):
        px, py = main["x"][i] + gx, main["y"][i] + gy
        on = (px >= -0.5) & (px < n - 0.5) & (py >= -0.5) & (py < n - 0.5)
        true_fraction = dens[on].sum() / dens.sum()
        assert metrics.source_psf_fraction[i] == pytest.approx(true_fraction, abs=3e-3)
        assert rows[i] == pytest.approx(true_fraction, abs=5e-3)


def test_edge_star_half_outside_is_flagged(main):
    res = main["res"]
    edge = np.flatnonzero(main["edge"])
    inside, outside = edge[0], edge[1]  # centred 1 px inside the frame / 2.5 FWHM outside
    assert np.all(res.flag[:, outside] & FLAG_LOW_COVERAGE)
    assert np.all(np.isnan(res.flux[:, outside])) and np.all(np.isnan(res.flux_err[:, outside]))
    assert np.all(res.good_fraction[:, outside] < 0.5)
    assert np.all(res.flag[:, inside] == 0)
    assert np.all(res.good_fraction[:, inside] > 0.5)
    ref = main["true"][:, inside] * main["ee"]
    chi = (res.flux[:, inside] - ref) / res.flux_err[:, inside]
    assert abs(chi.mean()) < 1.5


def test_masked_and_nonfinite_pixels(main):
    m, iso = main["model"], isolated(main)
    flux, err, mask = main["flux"][:2].copy(), main["err"][:2].copy(), main["mask"][:2].copy()
    star = np.flatnonzero(iso)[np.argmax(main["true"][0, iso])]  # the brightest isolated star
    x, y = int(round(main["x"][star])), int(round(main["y"][star]))
    base = m.fit(flux, err, mask=mask)
    # Hot pixels under the core, flagged in the mask: ignored (the flux stays right, the error grows).
    flux[0, y - 1 : y + 1, x - 1 : x + 1] = 1e6
    mask[0, y - 1 : y + 1, x - 1 : x + 1] = True
    res = m.fit(flux, err, mask=mask)
    ref = main["true"][0, star] * main["ee"]
    assert res.flag[0, star] == 0
    assert abs(res.flux[0, star] - ref) < 4 * res.flux_err[0, star]
    assert res.flux_err[0, star] > base.flux_err[0, star]
    # Non-finite data are bad pixels too: the same answer as masking them.
    flux2 = flux.copy()
    flux2[0][mask[0] & ~main["mask"][0]] = np.nan
    res2 = m.fit(flux2, err, mask=main["mask"][:2])
    np.testing.assert_allclose(res2.flux[0], res.flux[0], rtol=1e-12, equal_nan=True)
    # Less than half of the model on good pixels: NaN flux and the flag; the other stars do not move.
    yy, xx = np.mgrid[0 : flux.shape[1], 0 : flux.shape[2]]
    core = np.hypot(xx - main["x"][star], yy - main["y"][star]) < 3.0
    mask[0] |= core
    res = m.fit(flux, err, mask=mask)
    assert res.good_fraction[0, star] < 0.5
    assert res.flag[0, star] & FLAG_LOW_COVERAGE and np.isnan(res.flux[0, star])
    others = np.arange(m.nsources) != star
    np.testing.assert_allclose(res.flux[0, others], base.flux[0, others], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res.flux[1], base.flux[1], rtol=1e-12, equal_nan=True)


def test_batching_and_serialisation(main, tmp_path):
    m = main["model"]
    path = m.save(tmp_path / "prf_model.npz")
    loaded = PRFModel.load(path)
    flux, err, mask = main["flux"], main["err"], main["mask"]
    whole = main["res"]
    parts = [loaded.fit(flux[a:b], err[a:b], mask=mask[a:b]) for a, b in ((0, 7), (7, 8), (8, 20))]
    for key in ("flux", "flux_err"):
        got = np.concatenate([getattr(p, key) for p in parts])
        np.testing.assert_allclose(got, getattr(whole, key), rtol=1e-12, atol=0, equal_nan=True)
    np.testing.assert_array_equal(np.concatenate([p.flag for p in parts]), whole.flag)
    # One WCS per frame, read from each file (they differ in MJD-OBS only): one shared geometry/plan.
    listed = loaded.fit(flux[:3], err[:3], mask=mask[:3], wcs=main["wcs"][:3])
    np.testing.assert_allclose(listed.flux, whole.flux[:3], rtol=1e-12, equal_nan=True)
    assert len(loaded._cache) == 1
    np.testing.assert_array_equal(parts[0].source_id, m.source_ids)
    assert (loaded.mean_model != m.mean_model).nnz == 0
    again = PRFModel.from_arrays(loaded.to_arrays())
    np.testing.assert_array_equal(again.prior_sigma, m.prior_sigma)
    assert (again.source_mask != m.source_mask).nnz == 0


def test_masks_grow_with_flux(main):
    m = main["model"]
    size = np.diff(m.source_mask.indptr)
    on = size > 0
    flux = m.diagnostics["reference_flux"]
    ok = on & np.isfinite(flux) & ~main["edge"]
    rank = np.argsort(np.argsort(flux[ok])), np.argsort(np.argsort(size[ok]))
    assert np.corrcoef(*rank)[0, 1] > 0.9
    unc = m.uncontaminated_source_mask
    assert (unc > m.source_mask).nnz == 0  # a subset
    # An uncontaminated pixel is in exactly one source's mask.
    in_unc = np.unique(unc.indices)
    counts = np.bincount(m.source_mask.indices, minlength=m.mean_model.shape[1])
    assert np.all(counts[in_unc] == 1)
    # Pair members contaminate each other: few uncontaminated pixels compared to their masks.
    pair = main["pair"] >= 0
    assert np.diff(unc.indptr)[pair].sum() < np.diff(m.source_mask.indptr)[pair].sum()


def test_plot_shape_model(main, tmp_path):
    out = main["model"].plot_shape_model(tmp_path / "shape.png")
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
def dense_reference(model, flux, err, mask, fit_background):
    """Plain-numpy full-matrix solve of SPEC 6's system for one frame (what psfmachine does)."""
    X = model.mean_model.toarray().T  # (npix, nsrc)
    f, e = flux.ravel(), err.ravel()
    good = np.isfinite(f) & np.isfinite(e) & (e > 0) & ~mask.ravel()
    if fit_background:
        X = np.hstack([X, np.ones((X.shape[0], 1))])
    Xg, fg, wg = X[good], f[good], 1.0 / e[good] ** 2
    prec = np.concatenate([1 / model.prior_sigma**2, [0.0] * fit_background])
    mu = np.concatenate([model.prior_mu, [0.0] * fit_background])
    M = Xg.T @ (Xg * wg[:, None]) + np.diag(prec)
    w = np.linalg.solve(M, Xg.T @ (wg * fg) + prec * mu)
    return w, np.sqrt(np.diag(np.linalg.inv(M)))


@pytest.mark.parametrize("fit_background", [False, True])
def test_grouped_solution_equals_dense_solve(tmp_path, fit_background, monkeypatch):
    sim_kw = dict(
        n_frames=3, n_stars=14, size=90, pixscale=0.11, seed=5, n_pairs=3, n_edge=2, min_separation=8
    )
    f = setup_field(tmp_path, sim_kw, dict(MAIN_PARAMS, fit_background=fit_background))
    m = f["model"]
    plan = m._plan()
    assert plan.n_groups < m.nsources  # overlapping groups exist
    flux = f["flux"]
    res = m.fit(flux, f["err"], mask=f["mask"], return_model=True)
    for t in range(flux.shape[0]):
        w, werr = dense_reference(m, flux[t], f["err"][t], f["mask"][t], fit_background)
        ok = res.flag[t] == 0
        assert ok.sum() >= m.nsources - 2
        np.testing.assert_allclose(res.flux[t, ok], w[: m.nsources][ok], rtol=1e-8)
        np.testing.assert_allclose(res.flux_err[t, ok], werr[: m.nsources][ok], rtol=1e-8)
        if fit_background:
            assert res.background[t] == pytest.approx(w[-1], rel=1e-8)
            assert res.background_err[t] == pytest.approx(werr[-1], rel=1e-8)
        # The model image is X w (+ background).
        ws = w[: m.nsources]
        expect = m.mean_model.T @ ws + (w[-1] if fit_background else 0.0)
        np.testing.assert_allclose(res.model[t].ravel(), expect, rtol=1e-8, atol=1e-9 * np.abs(expect).max())
    # Big groups are solved a few frames at a time (bounded memory): same answer.
    monkeypatch.setattr(prf_solver, "_SOLVE_CHUNK", 1)
    chunked = m.fit(flux, f["err"], mask=f["mask"])
    np.testing.assert_allclose(chunked.flux, res.flux, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(chunked.flux_err, res.flux_err, rtol=1e-12, equal_nan=True)
    if fit_background:
        # A constant added to the frames goes into the background, exactly; the fluxes do not move.
        shifted = m.fit(flux + 7.5, f["err"], mask=f["mask"])
        np.testing.assert_allclose(shifted.background - res.background, 7.5, rtol=1e-9)
        np.testing.assert_allclose(shifted.flux, res.flux, rtol=1e-9, equal_nan=True)


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


def test_parameters_scale_with_pixel_scale(tmp_path):
    """A 4"/pix field (Kepler-like) fitted with the default radii scaled to arcsec gives the same fluxes
    as the 0.11"/pix twin with the RomanCuts defaults; both match the truth."""
    sim_kw = dict(n_frames=6, n_stars=30, size=260, seed=3, min_separation=30)
    d = PRFParameters()
    out = {}
    for pixscale in (0.11, 4.0):
        k = pixscale / 0.11
        params = dict(
            rmin=d.rmin * k, rmax=d.rmax * k, cut_r=d.cut_r * k, sparse_dist_lim=d.sparse_dist_lim * k
        )
        f = setup_field(tmp_path / f"p{pixscale}", dict(sim_kw, pixscale=pixscale), params)
        ref = f["true"] * f["ee"]
        ok = f["res"].flag == 0
        rel = (f["res"].flux - ref)[ok] / ref[ok]
        chi = ((f["res"].flux - ref) / f["res"].flux_err)[ok]
        assert np.median(np.abs(rel)) < 0.01
        assert 0.8 < np.std(chi) < 1.25
        assert f["model"].shape.rmax == pytest.approx(2.0 * k)
        out[pixscale] = f["res"].flux
    np.testing.assert_allclose(out[4.0], out[0.11], rtol=2e-3, equal_nan=True)


def test_per_frame_wcs_and_options(tmp_path):
    """Pointing jitter (one WCS per frame), frame_index, time_mask, bin_data."""
    sim_kw = dict(n_frames=6, n_stars=24, size=170, pixscale=0.11, seed=11, min_separation=24, jitter=0.4)
    f = setup_field(tmp_path, sim_kw, MAIN_PARAMS, per_frame_wcs=True)
    ref = f["true"] * f["ee"]
    iso = isolated(f)
    rel = ((f["res"].flux - ref) / ref)[:, iso]
    chi = ((f["res"].flux - ref) / f["res"].flux_err)[:, iso]
    assert np.median(np.abs(rel)) < 0.01
    assert 0.8 < np.std(chi) < 1.3
    # The same frames fitted against the wrong (first) WCS are much worse: the WCS list is used.
    wrong = f["model"].fit(f["flux"], f["err"], mask=f["mask"], wcs=f["wcs"][0])
    assert np.nanmedian(np.abs((wrong.flux - ref) / ref)[:, iso]) > 2 * np.median(np.abs(rel))
    cat = f["cat"]
    for extra in (dict(frame_index=2), dict(time_mask=np.arange(6) < 3), dict(bin_data=True)):
        p = PRFParameters(**MAIN_PARAMS, **extra)
        m = PRFModel.from_catalog(f["flux"], f["err"], f["wcs"], cat, params=p, mask=f["mask"])
        res = m.fit(f["flux"], f["err"], mask=f["mask"], wcs=f["wcs"])
        rel2 = ((res.flux - ref) / ref)[:, iso]
        assert np.median(np.abs(rel2)) < 0.015, extra


# ---------------------------------------------------------------------------------------------------
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


def test_shape_basis():
    sm = ShapeModel(10, 15, 0.1, 2.0, 0.2)
    rng = np.random.default_rng(1)
    r, phi = rng.uniform(0, 2, 500), rng.uniform(-7, 7, 500)
    D = sm.design(r, phi)
    np.testing.assert_allclose(D.sum(axis=1), 1.0, rtol=1e-12)  # partition of unity
    assert sm.n_cut == 2 and sm.nbasis == 2 + 11 * 15
    # Knots uniform in sqrt(r) from rmin to rmax.
    np.testing.assert_allclose(np.diff(np.sqrt(sm.breakpoints[1:])), np.sqrt(2) / 9 - np.sqrt(0.1) / 9)
    # Periodic in phi, and phi-free at the centre.
    np.testing.assert_allclose(D.toarray(), sm.design(r, phi + 2 * np.pi).toarray(), atol=1e-12)
    w = rng.normal(size=sm.nbasis)
    sm.weights = w
    v0 = sm.design(np.zeros(8), np.linspace(0, 6, 8)) @ w
    np.testing.assert_allclose(v0, v0[0], rtol=1e-12)


def test_bad_parameters_and_inputs(main, tmp_path):
    bad = [
        dict(rmin=2.0, rmax=1.0),
        dict(rmin=0.0),
        dict(cut_r=3.0),
        dict(sparse_dist_lim=1.0),
        dict(n_phi_knots=3),
        dict(n_r_knots=1.5),
        dict(frame_index="median"),
        dict(frame_index=True),
        dict(bin_data=2),
        dict(time_mask=np.zeros(3, bool)),
        dict(prior_sigma=-1.0),
        dict(flux_cut_off=-1.0),
        dict(clip_sigma=0.0),
        dict(rmax=float("nan")),
        dict(min_good_fraction=0),
        dict(shape_phi_smooth=0.0),
        dict(sources_flux_column=""),
    ]
    for kw in bad:
        with pytest.raises(ValueError, match="PRF parameter"):
            PRFParameters(**kw)
    f, e, mk, w = main["flux"][:2], main["err"][:2], main["mask"][:2], main["wcs"][0]
    cat = main["cat"]
    ra, dec, fl = np.asarray(cat["ra"]), np.asarray(cat["dec"]), np.asarray(cat["flux"])
    with pytest.raises(ValueError, match="time_mask"):
        PRFModel.build(f, e, w, ra, dec, fl, params=PRFParameters(time_mask=np.ones(5, bool)))
    with pytest.raises(ValueError, match="frame_index"):
        PRFModel.build(f, e, w, ra, dec, fl, params=PRFParameters(frame_index=7))
    with pytest.raises(ValueError, match="prior_mu"):
        PRFModel.build(f, e, w, ra, dec, fl, params=PRFParameters(prior_mu=np.ones(3)))
    with pytest.raises(ValueError, match="one entry per source"):
        PRFModel.build(f, e, w, ra, dec[:-1], fl)
    with pytest.raises(ValueError, match="flux_err shape"):
        PRFModel.build(f, e[:1], w, ra, dec, fl)
    with pytest.raises(ValueError, match="WCS"):
        PRFModel.build(f, e, [w], ra, dec, fl)
    with pytest.raises(BadInputError, match="cat.fits.*flux_g"):
        PRFModel.from_catalog(
            f, e, w, cat, params=PRFParameters(sources_flux_column="flux_g"), catalog_path="cat.fits"
        )
    with pytest.raises(ValueError, match="prior"):
        main["model"].fit(f, e, mask=mk, prior_sigma=0.0)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a model")
    with pytest.raises(BadInputError, match="junk.npz"):
        PRFModel.load(junk)
    assert dataclasses.replace(PRFParameters(), rmax=3.0).rmax == 3.0
    assert PRFParameters.from_dict(PRFParameters(time_mask=np.ones(2, bool)).to_dict()).time_mask.all()


def test_crowded_field_fallback(tmp_path):
    """simulate_images' default field (60 stars on 64x64 px) has almost no uncontaminated pixel: the shape
    is fitted on dominated pixels with the neighbours subtracted; SPEC's strict rule is an error."""
    sim = simulate_images(tmp_path, n_frames=6)
    flux, err, mask, wcs = load_frames(sim["paths"])
    cat = Table.read(sim["catalog"])
    with pytest.raises(ValueError, match="uncontaminated pixels"):
        PRFModel.from_catalog(
            flux, err, wcs[0], cat, mask=mask, params=PRFParameters(**MAIN_PARAMS, crowded_dominance=None)
        )
    m = PRFModel.from_catalog(flux, err, wcs[0], cat, mask=mask, params=PRFParameters(**MAIN_PARAMS))
    assert m.diagnostics["crowded_fallback"]
    res = m.fit(flux, err, mask=mask)
    true = np.array(Table.read(sim["truth"])["flux"]).reshape(res.flux.shape)
    ref = true * encircled_energy(1.1 / 0.11, sim["prf"])
    ok = res.flag == 0
    assert ok.mean() > 0.9
    assert np.median(np.abs(res.flux - ref)[ok] / ref[ok]) < 0.04
