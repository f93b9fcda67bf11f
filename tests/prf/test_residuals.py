"""The reference frame's residuals (photref_core.prf.residuals) against direct computations."""

from __future__ import annotations

import numpy as np

from photref_core.prf.inputs import reference_epochs
from photref_core.prf.residuals import MeanFrame, residual_map


def test_mean_frame_in_batches_equals_the_builds_epoch(main):
    """Frames added in uneven batches give the build's mean reference frame exactly."""
    flux, err, mask, wcs = main["flux"], main["err"], main["mask"], main["wcs"][0]
    nt = flux.shape[0]
    (expected,) = reference_epochs(flux, err, mask, [wcs] * nt, np.ones(nt, bool), "mean")
    mean = MeanFrame(flux.shape[1:])
    for lo, hi in ((0, 3), (3, 4), (4, nt)):
        mean.add(flux[lo:hi], err[lo:hi], mask[lo:hi])
    got = mean.epoch(wcs)
    assert got["n_frames"] == expected["n_frames"] == nt
    np.testing.assert_array_equal(got["good"], expected["good"])
    np.testing.assert_allclose(got["flux"], expected["flux"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(got["err"][got["good"]], expected["err"][got["good"]], rtol=1e-12)


def test_residual_map_is_the_prior_free_fit_of_the_mean_frame(main):
    """The model is the prior-free fit's model image of the mean frame; chi is (data - model) / error on
    good pixels, NaN elsewhere; the source pixels are where the model is at least the error; the mean
    frame's chi^2/dof is near 1 on this simulated field."""
    model, flux, err, mask, wcs = main["model"], main["flux"], main["err"], main["mask"], main["wcs"][0]
    mean = MeanFrame(flux.shape[1:])
    mean.add(flux, err, mask)
    epoch = mean.epoch(wcs)
    res = residual_map(model, epoch)
    ns = model.nsources
    direct = model.fit(
        epoch["flux"],
        np.where(epoch["good"], epoch["err"], 1.0),
        mask=~epoch["good"],
        wcs=wcs,
        return_model=True,
        prior_mu=np.zeros(ns),
        prior_sigma=np.inf,
    )
    np.testing.assert_allclose(res.model, direct.model[0], rtol=1e-9, atol=1e-9 * np.abs(res.model).max())
    good = epoch["good"]
    np.testing.assert_allclose(res.chi[good], ((epoch["flux"] - res.model) / epoch["err"])[good], rtol=1e-12)
    assert np.all(np.isnan(res.chi[~good]))
    np.testing.assert_array_equal(res.source_pixels, good & (res.model >= epoch["err"]))
    assert res.n_parameters == int(np.sum(~res.flagged))
    assert 0.8 < res.robust_chi2_per_dof < 1.3 and 0.8 < res.chi2_per_dof < 1.5
    np.testing.assert_allclose(res.x, main["x"], atol=0.05)  # source markers at the true positions
