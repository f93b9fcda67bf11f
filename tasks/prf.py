"""Prefect tasks of PRF photometry: image ingestion, shape model, per-frame-chunk flux fits, products.

Each task is named after the core function it wraps (:mod:`photref_core.ingest.images`,
:mod:`photref_core.prf.steps`).
"""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from photref_core import keys
from photref_core.ingest import images as core_images
from photref_core.prf import steps
from photref_core.prf.parameters import PRFParameters
from photref_core.prf.plots import plot_chi_image, plot_time_model

from .common import IO_RETRY
from .naming import batch_task_name, field_task_name, frame_range, write_task_name

__all__ = [
    "add_psf_photometry",
    "build_prf_model",
    "create_flux_arrays",
    "finalize_image_ingestion",
    "fit_frame_chunk",
    "frame_chunks",
    "ingest_image_batch",
    "plan_image_ingestion",
    "prf_model_key",
    "write_model_images",
    "write_prf_products",
]


def _shape_model_name(parameters) -> str:
    p: PRFParameters = parameters["params"]
    return f'shape model r {p.rmin:g}-{p.rmax:g}" knots {p.n_r_knots}x{p.n_phi_knots}' + (
        " + time model" if p.time_model else ""
    )


@task(
    name="plan-image-ingestion",
    task_run_name=field_task_name("plan images"),
    cache_policy=NO_CACHE,
    **IO_RETRY,
)
def plan_image_ingestion(store: str, images: list[str], strict: bool, frames_per_chunk: int):
    """Pre-pass over the new images; fix the pixel group's frame axis; cut writer batches."""
    return core_images.plan_image_ingestion(store, images, frames_per_chunk=frames_per_chunk, strict=strict)


@task(
    name="ingest-image-chunk",
    task_run_name=batch_task_name("ingest images"),
    cache_policy=NO_CACHE,
    **IO_RETRY,
)
def ingest_image_batch(store: str, batch, strict: bool):
    """Write one frame chunk of images (its only writer)."""
    return core_images.ingest_image_batch(store, batch, strict=strict)


@task(
    name="finalize-image-ingestion", task_run_name=field_task_name("finalize images"), cache_policy=NO_CACHE
)
def finalize_image_ingestion(store: str, results: list) -> dict:
    """Record quarantines and the images' content version."""
    return core_images.finalize_image_ingestion(store, results)


def _model_key(context, parameters) -> str:
    return keys.prf_model_task_key(parameters["key"])


@task(name="prf-model-key", task_run_name=field_task_name("model key"), cache_policy=NO_CACHE, **IO_RETRY)
def prf_model_key(store: str, params: PRFParameters, catalog: str) -> str:
    """The shape model's key: the images ingested (the store's content version), parameters, catalog."""
    return steps.prf_model_key(store, params, catalog)


@task(name="frame-chunks", task_run_name=field_task_name("frame chunks"), cache_policy=NO_CACHE, **IO_RETRY)
def frame_chunks(store: str) -> list[list[int]]:
    """The ingested frames' slots, one list per chunk of the pixel group: the fit fan-out's units."""
    return steps.frame_chunks(store)


@task(name="prf-shape-model", task_run_name=_shape_model_name, cache_key_fn=_model_key, **IO_RETRY)
def build_prf_model(store: str, catalog: str, params: PRFParameters, key: str) -> str:
    """Fit the field's shape model; returns its store group."""
    return steps.build_prf_model(store, catalog, params, key)


@task(name="create-flux-arrays", task_run_name=field_task_name("flux arrays"), cache_policy=NO_CACHE)
def create_flux_arrays(store: str, model_group: str, key: str) -> str:
    """Flux arrays at full size before the fit fan-out."""
    return steps.create_flux_arrays(store, model_group, key)


def _fit_key(context, parameters) -> str:
    return keys.prf_fit_task_key(parameters["flux_group"], parameters["slots"])


def _fit_name(parameters) -> str:
    return f"fit frames {frame_range(parameters['slots'])}"


@task(name="prf-fit-chunk", task_run_name=_fit_name, cache_key_fn=_fit_key, **IO_RETRY)
def fit_frame_chunk(
    store: str, model_group: str, flux_group: str, slots: list[int], blas_threads: int | None = None
) -> int:
    """Fluxes of every source in one frame chunk (grouped sparse solve, ``blas_threads`` BLAS threads)."""
    return steps.fit_frame_chunk(store, model_group, flux_group, slots, blas_threads)


@task(name="prf-products", task_run_name=write_task_name, cache_policy=NO_CACHE, **IO_RETRY)
def write_prf_products(
    store: str, model_group: str, flux_group: str, output: str, plot: bool, fluxes: str | None = None
) -> dict:
    """The long-format flux table (the flux set ``fluxes``), the PSF metrics, the reference frame's chi^2 per
    degree of freedom and (``plot``) the shape-model plot, the chi image and (with a time model) the time
    model's plot beside the table."""
    import numpy as np

    # Each table read once: written, then counted.
    table = steps.flux_table(store, flux_group, fluxes)
    transforms = steps.transform_table(store, flux_group)
    sources = steps.source_table(store, model_group)
    table_path = steps.write_flux_table(store, output, table, transforms, model_group, sources)
    model = steps.shared_prf_model(store, model_group)  # the fits' model: its geometry is built
    residuals = steps.reference_residuals(store, model_group)
    plot_path = chi_path = time_path = None
    if plot:
        stem = os.path.splitext(table_path)[0]
        plot_path = model.plot_shape_model(stem + "_prf.png")
        chi_path = plot_chi_image(residuals, stem + "_chi.png")
        if transforms is not None:
            times, static, moving = steps.flux_sets_by_time(store, flux_group)
            time_path = plot_time_model(model, times, static, moving, stem + "_time.png")
    fraction = np.asarray(sources["source_psf_fraction"])
    products = {
        "fluxes": table_path,
        "flux_set": table.meta["FLUXSET"],
        "plot": plot_path,
        "chi_plot": chi_path,
        "time_plot": time_path,
        "residuals": residuals.summary(),
        "model_group": model_group,
        "flux_group": flux_group,
        "n_sources": int(model.nsources),
        "n_frames": int(len(table) // max(model.nsources, 1)),
        **steps.flux_table_figures(table),
        "median_source_psf_fraction": float(np.nanmedian(fraction)) if fraction.size else float("nan"),
    }
    if transforms is not None:
        terms = [c for c in transforms.colnames if c not in ("frame_id", "time")]
        span = {
            t: float(np.nanmax(transforms[t]) - np.nanmin(transforms[t])) if len(transforms) else 0.0
            for t in terms
        }
        products["time_model"] = {"transform": transforms.meta["TRANSFRM"], "range_px": span}
        if "perturbed_ratio_mean" in sources.colnames:
            products["time_model"]["median_perturbed_ratio_mean"] = float(
                np.nanmedian(sources["perturbed_ratio_mean"])
            )
            products["time_model"]["median_perturbed_std"] = float(np.nanmedian(sources["perturbed_std"]))
            products["time_model"]["perturbation"] = bool(model.time_model.perturbation is not None)
    return products


@task(
    name="prf-model-images",
    task_run_name=field_task_name("model images of"),
    cache_policy=NO_CACHE,
    **IO_RETRY,
)
def write_model_images(
    store: str, model_group: str, flux_group: str, path: str, fluxes: str | None = None
) -> str:
    """Every frame's model and residual image into one FITS file, a frame chunk at a time."""
    return steps.write_model_images(store, model_group, flux_group, path, fluxes)


@task(
    name="add-psf-photometry",
    task_run_name=field_task_name("psf photometry into"),
    cache_policy=NO_CACHE,
    **IO_RETRY,
)
def add_psf_photometry(store: str, flux_group: str, zero_point: float, fluxes: str | None = None) -> dict:
    """PRF fluxes as magnitudes, added to the photometry store as one more photometry (idempotent)."""
    return steps.add_psf_photometry(store, flux_group, zero_point=zero_point, fluxes=fluxes)
