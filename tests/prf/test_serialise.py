"""photref_core.prf.serialise: a saved model fits frames exactly as the one that was built."""

from __future__ import annotations

import numpy as np

from photref_core.prf.model import PRFModel


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
    assert len(loaded.frames) == 1
    np.testing.assert_array_equal(parts[0].source_id, m.source_ids)
    assert (loaded.mean_model != m.mean_model).nnz == 0
    again = PRFModel.from_arrays(loaded.to_arrays())
    np.testing.assert_array_equal(again.prior_sigma, m.prior_sigma)
    assert (again.source_mask != m.source_mask).nnz == 0
