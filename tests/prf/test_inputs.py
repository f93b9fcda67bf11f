"""photref_core.prf.parameters and .inputs: bad parameters and inputs are refused, naming them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from photref_core.errors import BadInputError
from photref_core.prf.model import PRFModel
from photref_core.prf.parameters import PRFParameters


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
