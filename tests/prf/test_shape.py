"""photref_core.prf.shape: the basis."""

from __future__ import annotations

import numpy as np

from photref_core.prf.shape import ShapeModel


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
