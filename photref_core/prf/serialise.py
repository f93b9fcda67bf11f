"""A PRF model as numpy arrays and ``.npz`` files (no pickles): what parallel fit tasks load."""

from __future__ import annotations

import json
import os

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import sparse

from ..errors import BadInputError
from .parameters import PRFParameters
from .perturbation import Perturbation, TimeBasis
from .shape import ShapeModel
from .timemodel import TimeModel

__all__ = ["FORMAT_VERSION", "load_model", "model_from_arrays", "model_to_arrays", "save_model"]

FORMAT_VERSION = 1
"""Version of the arrays' layout; a model of another version is refused."""


def model_to_arrays(model) -> dict:
    """The work of :meth:`PRFModel.to_arrays <photref_core.prf.model.PRFModel.to_arrays>` (documented
    there) for ``model``."""
    mm = model.mean_model
    out = {
        "format_version": np.array(FORMAT_VERSION),
        "params_json": np.array(json.dumps(model.params.to_dict())),
        "shape_weights": model.shape.weights,
        "shape_norm": np.array(model.shape.norm),
        "ra": model.ra,
        "dec": model.dec,
        "flux_estimate": model.flux_estimate,
        "source_id": model.source_ids,
        "prior_mu": model.prior_mu,
        "prior_sigma": model.prior_sigma,
        "wcs_header": np.array(model.wcs.to_header_string(relax=True)),
        "image_shape": np.array(model.image_shape, dtype=np.int64),
        "mean_model_data": mm.data,
        "mean_model_indices": mm.indices.astype(np.int64),
        "mean_model_indptr": mm.indptr.astype(np.int64),
    }
    for name in ("source_mask", "uncontaminated_source_mask"):
        m = getattr(model, name)
        if m is not None:
            out[f"{name}_indices"] = m.indices.astype(np.int64)
            out[f"{name}_indptr"] = m.indptr.astype(np.int64)
    if model.shape_data is not None:
        for k, v in model.shape_data.items():
            out[f"shape_data_{k}"] = v
    tm = model.time_model
    if tm is not None:
        out.update(
            time_kind=np.array(tm.kind),
            time_shape_weights=tm.shape.weights,
            time_shape_norm=np.array(tm.shape.norm),
            time_times=np.asarray(tm.times, dtype=float),
            time_transforms=np.asarray(tm.transforms, dtype=float),
            time_diagnostics_json=np.array(json.dumps(tm.diagnostics)),
        )
        pert = tm.perturbation
        if pert is not None:
            out.update(
                perturbation_radius=np.array(pert.radius),
                perturbation_nknots=np.array(pert.nknots),
                perturbation_segments=pert.basis.segments,
                perturbation_weights=pert.weights,
                perturbation_diagnostics_json=np.array(json.dumps(pert.diagnostics)),
            )
    return out


def model_from_arrays(cls, arrays):
    """The work of :meth:`PRFModel.from_arrays <photref_core.prf.model.PRFModel.from_arrays>` (documented
    there); ``cls`` is the model class."""
    a = {k: np.asarray(arrays[k]) for k in arrays}
    if int(a.get("format_version", -1)) != FORMAT_VERSION:
        raise ValueError(f"PRF model format version {a.get('format_version')} is not {FORMAT_VERSION}")
    params = PRFParameters.from_dict(json.loads(str(a["params_json"])))
    sm = ShapeModel(params.n_r_knots, params.n_phi_knots, params.rmin, params.rmax, params.cut_r)
    sm.weights = a["shape_weights"].astype(float)
    sm.norm = float(a["shape_norm"])
    wcs = WCS(fits.Header.fromstring(str(a["wcs_header"])))
    shape = tuple(int(s) for s in a["image_shape"])
    m = cls(
        sm,
        params,
        a["ra"],
        a["dec"],
        a["flux_estimate"],
        a["source_id"],
        wcs,
        shape,
        a["prior_mu"],
        a["prior_sigma"],
    )
    ns, npix = m.nsources, shape[0] * shape[1]
    mm = sparse.csr_array(
        (a["mean_model_data"], a["mean_model_indices"], a["mean_model_indptr"]), shape=(ns, npix)
    )
    m.frames.entry()["model"] = mm
    for name in ("source_mask", "uncontaminated_source_mask"):
        if f"{name}_indices" in a:
            idx = a[f"{name}_indices"]
            setattr(
                m,
                name,
                sparse.csr_array((np.ones(idx.size, bool), idx, a[f"{name}_indptr"]), shape=(ns, npix)),
            )
    if "shape_data_r" in a:
        m.shape_data = {k: a[f"shape_data_{k}"] for k in ("r", "phi", "y", "xi", "eta")}
    if "time_kind" in a:
        tsm = ShapeModel(params.n_r_knots, params.n_phi_knots, params.rmin, params.rmax, params.cut_r)
        tsm.weights = a["time_shape_weights"].astype(float)
        tsm.norm = float(a["time_shape_norm"])
        m.time_model = TimeModel(
            kind=str(a["time_kind"]),
            shape=tsm,
            times=a["time_times"].astype(float),
            transforms=a["time_transforms"].astype(float).reshape(a["time_times"].size, -1),
            diagnostics=json.loads(str(a["time_diagnostics_json"])),
        )
        if "perturbation_weights" in a:
            m.time_model.perturbation = Perturbation(
                radius=float(a["perturbation_radius"]),
                nknots=int(a["perturbation_nknots"]),
                basis=TimeBasis(a["perturbation_segments"].astype(float).reshape(-1, 7)),
                weights=a["perturbation_weights"].astype(float),
                diagnostics=json.loads(str(a["perturbation_diagnostics_json"])),
            )
    return m


def save_model(model, path) -> str:
    """The work of :meth:`PRFModel.save <photref_core.prf.model.PRFModel.save>` (documented there)."""
    path = os.fspath(path)
    np.savez_compressed(path, **model_to_arrays(model))
    return path if path.endswith(".npz") else path + ".npz"


def load_model(cls, path):
    """The work of :meth:`PRFModel.load <photref_core.prf.model.PRFModel.load>` (documented there);
    ``cls`` is the model class."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            return model_from_arrays(cls, {k: z[k] for k in z.files})
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(path, f"not a readable PRF model file ({exc})") from exc
