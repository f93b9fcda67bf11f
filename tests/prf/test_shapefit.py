"""photref_core.prf.shapefit: normalisation, masks, the crowded fallback."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from prfutil import MAIN_PARAMS, isolated

from photref_core.prf.model import PRFModel
from photref_core.prf.parameters import PRFParameters
from photref_core.simulate.fields import load_frames
from photref_core.simulate.images import encircled_energy, prf_density, simulate_images


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


def test_psf_fraction_equals_sub_sampling_every_pixel(main):
    """The metric sub-samples only the pixels on the disc's edge; sub-sampling every pixel near a source
    (the plain reference) gives the same fractions."""
    m = main["model"]
    g, sm, n = m.frames.geometry(), m.shape, m.params.psf_subsample
    s = (np.arange(n) + 0.5) / n - 0.5
    sy, sx = (a.ravel() for a in np.meshgrid(s, s, indexing="ij"))
    near = g.r <= sm.rmax + 2.0 * np.sqrt(np.sum(g.jac**2, axis=(1, 2)))[g.src]
    src, J = g.src[near], g.jac[g.src[near]]
    inside = np.zeros(src.size)
    for dx, dy in zip(sx, sy, strict=True):
        xi = g.xi[near] + J[:, 0, 0] * dx + J[:, 0, 1] * dy
        eta = g.eta[near] + J[:, 1, 0] * dx + J[:, 1, 1] * dy
        inside += np.hypot(xi, eta) <= sm.rmax
    val = 10.0 ** sm.log_value(np.minimum(g.r[near], sm.rmax), g.phi[near]) / sm.norm * g.area[src]
    reference = np.bincount(src, weights=val * inside / sx.size, minlength=m.nsources)
    np.testing.assert_allclose(m.get_psf_metrics().source_psf_fraction, reference, rtol=1e-12, atol=1e-15)
