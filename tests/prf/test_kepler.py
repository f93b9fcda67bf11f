"""``photref prf`` on real pixels: the Kepler FFI cutout (``tests/data/kepler``), as a user runs it.

The frame and the catalog are made by ``bench/kepler_field.py`` (collateral, saturated and bleed pixels
masked, background subtracted, stars found by photutils' DAOStarFinder); the radii are SPEC 6's scaled to
Kepler's 4"/pix. The fitted fluxes are checked against aperture photometry corrected on the data.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from bench.kepler_field import KEPLER_PIXSCALE, aperture_check, prepare_kepler_field
from photref_core.prf.solver import FLAG_LOW_COVERAGE
from photref_core.simulate.fields import spec_radii


@pytest.mark.slow
def test_kepler_ffi_fluxes_match_aperture_photometry(prefect_server, tmp_path, monkeypatch):
    """Isolated bright stars: median fitted / aperture-corrected 3-pixel flux in [0.99, 1.05]; every
    source fitted except the saturated star, which is flagged."""
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    field = prepare_kepler_field(tmp_path / "kepler")
    assert 380 <= field["n_sources"] <= 440  # the README: ~390 detectable sources
    assert len(field["saturated"]) == 1
    output = tmp_path / "fluxes.fits"
    radii = [f"--{k.replace('_', '-')}={v}" for k, v in spec_radii(KEPLER_PIXSCALE).items()]
    command = ["prf", str(tmp_path / "s.zarr"), field["image"], "--catalog", field["catalog"]]
    assert main([*command, "--output", str(output), "--no-plot", *radii]) == 0

    fluxes = Table.read(output, hdu="FLUXES")
    assert len(fluxes) == field["n_sources"]
    nan = np.asarray(fluxes["source_id"][~np.isfinite(fluxes["flux"])])
    assert nan.tolist() == field["saturated"]
    saturated = fluxes[np.isin(fluxes["source_id"], field["saturated"])]
    assert np.all(saturated["flag"] & FLAG_LOW_COVERAGE)

    check = aperture_check(field["image"], field["catalog"], fluxes)
    assert check["n_stars"] >= 10
    assert 0.99 <= check["median_ratio"] <= 1.05, check
    assert 1.0 < check["aperture_correction"] < 1.1  # the 5-pixel aperture holds a few % more than 3
    with fits.open(field["image"]) as hdul:
        assert hdul["MASK"].data[:20].all() and hdul["MASK"].data[:, :12].all()  # collateral never fitted
