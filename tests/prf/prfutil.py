"""Simulated PRF fields with a known truth for the tests of photref_core.prf (photref_core.simulate_images).

The reference for a fitted flux is the true total flux times the true PRF's encircled energy inside
``rmax`` (computed here by polar quadrature of the true PRF, independently of the model): SPEC 6 defines
the fitted weight as the source's flux inside ``rmax``.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from photref_core.prf.model import PRFModel
from photref_core.prf.parameters import PRFParameters
from photref_core.simulate.fields import load_frames
from photref_core.simulate.images import encircled_energy, simulate_images

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
    plan = f["model"].frames.plan()
    return (plan.group_sizes[plan.labels] == 1) & (f["pair"] < 0) & ~f["edge"]
