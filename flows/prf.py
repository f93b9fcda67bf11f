"""Flow: PRF photometry of a field's images (SPEC 6).

DAG::

    plan-image-ingestion -> ingest-image-chunk x N -> finalize-image-ingestion
        -> prf-model-key -> prf-shape-model -> create-flux-arrays
        -> frame-chunks -> prf-fit-chunk x M (parallel) -> prf-products [-> prf-model-images]

The shape model is cached on the images ingested, the PRF parameters, the catalog file and the code
version; each frame chunk's fit is cached on the model and its frames, so an unchanged re-run and a run
killed half-way redo nothing that was done.
"""

from __future__ import annotations

import os
from typing import Literal

from prefect import flow
from prefect.futures import as_completed

from photref_core.checks import check_output_fits
from photref_core.errors import BadInputError
from photref_core.prf.parameters import PSF_ZERO_POINT, PRFParameters
from photref_core.store.lock import store_run
from photref_core.store.schema import store_url
from tasks.naming import artifact_key, field_name, flow_run_name, prf_changes
from tasks.prf import (
    add_psf_photometry,
    build_prf_model,
    create_flux_arrays,
    finalize_image_ingestion,
    fit_frame_chunk,
    frame_chunks,
    ingest_image_batch,
    plan_image_ingestion,
    prf_model_key,
    write_model_images,
    write_prf_products,
)

from .artifacts import IMAGE_PROGRESS, PRF_PROGRESS, publish_prf_summary
from .progress import Progress
from .runners import blas_threads_per_task, make_task_runner, run_by_hand


@flow(
    name="prf-photometry",
    flow_run_name=flow_run_name("prf", lambda p: prf_changes(p.get("params"))),
    task_runner=make_task_runner(),
)
def solve_prf(
    store: str,
    images: list[str],
    catalog: str,
    output: str,
    params: PRFParameters = PRFParameters(),  # noqa: B008 - never changed: one shared default is safe
    strict: bool = False,
    frames_per_chunk: int = 8,
    plot: bool = True,
    as_photometry: bool = False,
    zero_point: float = PSF_ZERO_POINT,
    lock_timeout: float | None = 0.0,
    output_fluxes: Literal["time", "static"] | None = None,
    model_output: str | None = None,
) -> dict:
    """Ingest images, build the field's PRF shape model, fit every source's flux in every frame.

    Parameters
    ----------
    store : str
        The field's store (created if missing); images go to its group ``prf``.
    images : list of str
        Image files or globs (SPEC 1.3).
    catalog : str
        Sources: ``source_id``, ``ra``, ``dec`` and the flux-estimate column.
    output : str
        Long-format flux table (FITS): frame_id, source_id, flux, flux_err, flag. A PNG of the shape
        model is written beside it (``<name>_prf.png``).
    params : PRFParameters
        The PRF parameters (psfmachine / RomanCuts ``Machine`` names; radii in arcsec). As JSON (a
        deployment, the UI form): the scalar fields, ``time_mask`` and the priors as lists.
    strict : bool
        Fail on a bad image instead of quarantining it.
    frames_per_chunk : int
        Frames per chunk of a new pixel group: the unit of one ingestion and one fit task.
    plot : bool
        Write the shape-model PNG.
    as_photometry : bool
        Also add the fluxes as magnitudes (``zero_point - 2.5 log10 flux``) to the store's photometry,
        as one more photometry named ``psf``, so the master flow uses them.
    zero_point : float
        Magnitude zero point of ``as_photometry``.
    lock_timeout : float or None
        Seconds to wait for another run on the same store (0: refuse at once; None: wait).
    output_fluxes : {'time', 'static'}, optional
        The flux set ``output`` and ``as_photometry`` take when ``params.time_model`` builds the time model
        (both are in the store): the time model's (default) or the static model's. ``'time'`` without the
        time model is an error.
    model_output : str, optional
        A FITS file of every frame's model image and residual image (data - model), image HDUs ``MODEL``
        and ``RESID`` per frame with its WCS and ``FRAMEID`` (of the ``output_fluxes`` set), written a
        frame chunk at a time. The path is checked before any work.

    Returns
    -------
    dict
        Paths of the products, counts and the median fraction of the sources' PRF on the frames.
    """
    from flows.ingest import expand_frame_paths, with_quarantines

    # One spelling of every path (a relative store path would miss the cache of an absolute one).
    store, catalog, output = store_url(store), os.path.abspath(catalog), os.path.abspath(output)
    if output_fluxes == "time" and not params.time_model:
        raise ValueError("output_fluxes='time' needs the time model (params.time_model=True)")
    if model_output is not None:  # a bad name fails now, not after the fits
        model_output = check_output_fits("model_output", model_output)
        if model_output == output:
            raise BadInputError(model_output, "model_output and output are the same file")
    with store_run(store, timeout=lock_timeout):
        plan = plan_image_ingestion(store, expand_frame_paths(images), strict, frames_per_chunk)
        futures = [ingest_image_batch.submit(store, batch, strict) for batch in plan.batches]
        n_images = sum(len(batch.slots) for batch in plan.batches)
        with Progress(
            n_images,
            artifact_key(IMAGE_PROGRESS, store),
            f"Ingesting {n_images} images into {field_name(store)}",
        ) as progress:
            results = progress.gather(futures)
        ingestion = with_quarantines(finalize_image_ingestion(store, results), plan, results)

        key = prf_model_key(store, params, catalog)
        model_group = build_prf_model(store, catalog, params, key)
        flux_group = create_flux_arrays(store, model_group, key)
        chunks = frame_chunks(store)
        # BLAS threads set here, not by the user's OPENBLAS_NUM_THREADS: the cores shared out among the fits.
        threads = blas_threads_per_task(len(chunks))
        fits = [fit_frame_chunk.submit(store, model_group, flux_group, s, threads) for s in chunks]
        n_frames = sum(map(len, chunks))
        progress_key = artifact_key(PRF_PROGRESS, store)
        with Progress(
            n_frames, progress_key, f"PRF fits of {n_frames} frames of {field_name(store)}"
        ) as progress:
            for future in as_completed(fits):
                progress.advance(future.result())
        products = write_prf_products(store, model_group, flux_group, output, plot, output_fluxes)
        if model_output is not None:
            products["model_images"] = write_model_images(
                store, model_group, flux_group, model_output, output_fluxes
            )
        if as_photometry:
            products["psf_photometry"] = add_psf_photometry(store, flux_group, zero_point, output_fluxes)

    publish_prf_summary(store, output, plan, ingestion, products, params)
    return products | {"ingestion": ingestion}


def run_prf(store, images, catalog, output, max_workers=None, dask_address=None, **kwargs) -> dict:
    """Run :func:`solve_prf` by hand (see :func:`flows.runners.run_by_hand`): a chosen task runner
    (bounded threads or a Dask scheduler), no flow-run heartbeat unless one is configured."""
    return run_by_hand(
        solve_prf,
        max_workers,
        dask_address,
        store=os.fspath(store),
        images=[os.fspath(i) for i in images],
        catalog=os.fspath(catalog),
        output=os.fspath(output),
        **kwargs,
    )
