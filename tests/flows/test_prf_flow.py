"""The PRF flow on a real Prefect server: pixel store, fluxes equal the core's, caching, bad images."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from photref_core.ingest.readers import read_image
from photref_core.master.parameters import MasterParameters
from photref_core.prf.model import PRFModel
from photref_core.prf.parameters import PRFParameters


@pytest.fixture(scope="module")
def image_field(tmp_path_factory):
    from photref_core.simulate.images import simulate_images

    return simulate_images(
        tmp_path_factory.mktemp("images"), n_frames=10, n_stars=30, size=160, min_separation=24, seed=11
    )


@pytest.fixture
def images(image_field, tmp_path):
    dst = tmp_path / "images"
    shutil.copytree(Path(image_field["catalog"]).parent, dst)
    return sorted((dst / "frames").glob("*.fits")), dst / "catalog.fits", dst / "truth.fits"


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return {r.name: r.state.name for r in runs}

    return asyncio.run(read())


def run(store, paths, catalog, output, **kw):
    from flows.prf import solve_prf

    state = solve_prf(
        store=str(store),
        images=[str(p) for p in paths],
        catalog=str(catalog),
        output=str(output),
        params=PRFParameters(rmax=1.1),
        return_state=True,
        **kw,
    )
    return state.result(), task_states(state.state_details.flow_run_id)


def test_prf_flow_matches_core_and_is_cached(prefect_server, image_field, images, tmp_path, monkeypatch):
    paths, catalog, truth = images
    store, output = tmp_path / "s.zarr", tmp_path / "fluxes.fits"
    products, states = run(store, paths, catalog, output)

    # The pixel store holds exactly the frames.
    import xarray as xr

    ds = xr.open_zarr(str(store), group="prf", consolidated=False)
    assert ds["flux"].dims == ("frame", "pixel")
    by_id = {str(f): k for k, f in enumerate(ds.frame_id.values)}
    cubes = {"flux": [], "flux_err": [], "mask": []}
    for p in paths:
        image = read_image(p)
        k = by_id[image["frame_id"]]
        for name in cubes:
            np.testing.assert_array_equal(ds[name].values[k], image[name].ravel())
            cubes[name].append(image[name])

    # The fluxes equal the core's direct build + fit on the same data.
    cat = Table.read(catalog)
    wcs = WCS(fits.getheader(paths[0]))
    model = PRFModel.build(
        np.array(cubes["flux"]),
        np.array(cubes["flux_err"]),
        wcs,
        np.asarray(cat["ra"]),
        np.asarray(cat["dec"]),
        np.asarray(cat["flux"], float),
        source_ids=np.asarray(cat["source_id"]).astype(np.int64),
        params=PRFParameters(rmax=1.1),
        mask=np.array(cubes["mask"]),
    )
    direct = model.fit(np.array(cubes["flux"]), np.array(cubes["flux_err"]), mask=np.array(cubes["mask"]))
    table = Table.read(output, hdu="FLUXES")
    assert table.colnames == ["frame_id", "source_id", "flux", "flux_err", "flag"]
    # The sources' PSF metrics; no perturbed ones without a time model (SPEC 6: None).
    sources = Table.read(output, hdu="SOURCES")
    assert sources.colnames == ["source_id", "ra", "dec", "source_psf_fraction"]
    np.testing.assert_allclose(
        sources["source_psf_fraction"], model.get_psf_metrics().source_psf_fraction, rtol=1e-6
    )
    assert table["source_id"].dtype.kind == "i" and table["source_id"].dtype.itemsize == 8
    assert table["flux"].dtype.kind == "f" and table["flux"].dtype.itemsize == 8
    assert len(table) == len(paths) * len(cat)
    frame_ids = [read_image(p, header_only=True)["frame_id"] for p in paths]
    for t, fid in enumerate(frame_ids):
        rows = table[table["frame_id"] == fid]
        np.testing.assert_array_equal(np.asarray(rows["source_id"]), np.asarray(cat["source_id"]))
        np.testing.assert_allclose(rows["flux"], direct.flux[t], rtol=1e-9)
        np.testing.assert_allclose(rows["flux_err"], direct.flux_err[t], rtol=1e-9)
    # Isolated stars agree with the truth (flux inside rmax = total x encircled energy) to about 1 %.
    tr = Table.read(truth)
    from photref_core.simulate.images import encircled_energy

    ee = encircled_energy(1.1 / 0.11, prf=image_field["prf"])
    isolated = (tr["pair_id"] < 0) & ~tr["edge"]
    expect = {(str(r["frame_id"]), int(r["source_id"])): r["flux"] * ee for r in tr[isolated]}
    rel = [
        row["flux"] / expect[(str(row["frame_id"]), int(row["source_id"]))] - 1
        for row in table
        if (str(row["frame_id"]), int(row["source_id"])) in expect
    ]
    assert len(rel) > 100 and np.median(np.abs(rel)) < 0.01
    assert Path(products["plot"]).exists()

    # The fit tasks shared one loaded model and its solve plan: a further chunk fit in this process builds
    # no plan and writes the same rows; a rebuilt model (new build id) is loaded afresh.
    from photref_core.prf import cache, steps
    from photref_core.store.schema import open_group

    shared = steps.shared_prf_model(store, products["model_group"])
    assert shared is steps.shared_prf_model(str(store), products["model_group"])
    built = []
    real_plan = cache.SolvePlan
    monkeypatch.setattr(cache, "SolvePlan", lambda *a, **k: built.append(1) or real_plan(*a, **k))
    steps.fit_frame_chunk(store, products["model_group"], products["flux_group"], [0, 1, 2], 1)
    assert built == []
    np.testing.assert_array_equal(Table.read(output, hdu="FLUXES")["flux"], table["flux"])
    open_group(store, path=products["model_group"], mode="r+").attrs["build_id"] = "rebuilt"
    assert steps.shared_prf_model(store, products["model_group"]) is not shared
    monkeypatch.undo()

    # Unchanged re-run: the model and every fit come from the cache.
    again, states2 = run(store, paths, catalog, output)
    assert again["model_group"] == products["model_group"]
    assert [v for k, v in states2.items() if k.startswith("shape model ")] == ["Cached"]
    assert all(v == "Cached" for k, v in states2.items() if k.startswith("fit frames"))
    assert not any(k.startswith("ingest images") for k in states2)


def test_bad_images_are_quarantined(prefect_server, images, tmp_path):
    paths, catalog, truth = images
    paths[0].write_bytes(paths[0].read_bytes()[:2000])
    fits.writeto(paths[1], np.zeros((160, 160), np.float32), overwrite=True)  # no WCS
    products, _ = run(tmp_path / "s.zarr", paths, catalog, tmp_path / "f.fits")
    from photref_core.ingest.images import open_image_group as _open

    q = _open(tmp_path / "s.zarr").attrs["quarantine"]
    assert "cannot read the image" in q[str(paths[0])]["reason"]
    assert "no celestial WCS" in q[str(paths[1])]["reason"]
    assert products["n_frames"] == len(paths) - 2


def test_psf_photometry_feeds_the_master(prefect_server, images, tmp_path):
    """--as-photometry: the PRF fluxes become a photometry of the store and the master flow uses them."""
    from flows.master_photref import build_master_photref
    from photref_core.master.fits import read_master
    from photref_core.store.schema import open_store

    paths, catalog, truth = images
    store = tmp_path / "s.zarr"
    products, _ = run(store, paths, catalog, tmp_path / "f.fits", as_photometry=True, zero_point=25.0)
    assert products["psf_photometry"]["photometry"] == 0
    again, _ = run(store, paths, catalog, tmp_path / "f.fits", as_photometry=True, zero_point=25.0)
    assert again["psf_photometry"] == {"photometry": 0, "unchanged": True}
    group = open_store(store)
    assert group.attrs["photometry_names"] == ["psf"] and group["mag"].shape[2] == 1

    table = Table.read(tmp_path / "f.fits", hdu="FLUXES")
    master = build_master_photref(
        store=str(store),
        catalog=str(catalog),
        output=str(tmp_path / "m.fits"),
        params=MasterParameters(fit_terms="O1{magnitude}", min_nobs_median_fraction=0.0),
    )
    phot = read_master(master["master"])["photometries"][0]
    assert len(phot) > 10
    for row in phot[:10]:
        fluxes = table["flux"][table["source_id"] == int(row["source_id"])]
        assert row["magnitude"] == pytest.approx(25.0 - 2.5 * np.log10(np.median(fluxes)), abs=0.02)


def test_add_photometry_to_an_existing_store(small_field, tmp_path):
    """A PSF photometry added to a P=3 store becomes photometry 3; later frame files still ingest."""
    from photref_core.catalog import read_catalog
    from photref_core.ingest.arrays import add_photometry
    from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion
    from photref_core.store.schema import open_store

    frames = sorted(Path(small_field.frames[0]).parent.glob("*.fits"))
    store = tmp_path / "s.zarr"
    cat = read_catalog(small_field.catalog)
    plan = plan_ingestion(store, frames[:20], catalog=cat)
    finalize_ingestion(store, [r for b in plan.batches for r in ingest_batch(store, b)])
    group = open_store(store)
    fids = [str(f) for f in group["frame_id"][:]][:5] + ["not-a-frame"]
    ids = np.concatenate([group["source_id"][:10], np.array([12345], dtype=np.uint64)])
    values = np.arange(6 * 11, dtype=float).reshape(6, 11)
    version = group.attrs["content_version"]
    out = add_photometry(store, fids, ids, values, values / 100 + 0.01, "psf")
    assert out == {
        "photometry": 3,
        "frames_matched": 5,
        "frames_unknown": 1,
        "sources_matched": 10,
        "sources_unknown": 1,
    }
    group = open_store(store)
    assert group["mag"].shape[2] == 4 and group.attrs["content_version"] != version
    # The markers did not change, so their one-chunk copy stays current (readers keep the fast path).
    from photref_core.store.frames import frame_states, state_copy_is_current

    assert state_copy_is_current(group)
    np.testing.assert_array_equal(frame_states(group), group["frame_state"][:])
    np.testing.assert_array_equal(group["mag"][:5, :10, 3], values[:5, :10])
    assert np.isnan(group["mag"][5:, :, 3]).all() and np.isnan(group["mag"][:5, 10:, 3]).all()
    before = group["mag"][:5, :, :3]
    # The same name again replaces in place; new frame files fill photometries 0-2 only.
    add_photometry(store, fids, ids, values + 1, values / 100 + 0.01, "psf")
    plan = plan_ingestion(store, frames, catalog=cat)
    results = [r for b in plan.batches for r in ingest_batch(store, b)]
    assert all(r.reason is None for r in results) and len(results) == len(frames) - 20
    group = open_store(store)
    assert group["mag"].shape[2] == 4
    np.testing.assert_array_equal(group["mag"][:5, :10, 3], values[:5, :10] + 1)
    np.testing.assert_array_equal(group["mag"][:5, :, :3], before)
    assert np.isnan(group["mag"][20:, :, 3]).all() and np.isfinite(group["mag"][20:, :, :3]).any()


def test_time_model_through_the_command(prefect_server, tmp_path, monkeypatch, capsys):
    """``photref prf --time-model --perturbation`` on a drifting field: both flux sets and the transforms in
    the store, equal to the core's fit of the stored model (its perturbation included); ``--output`` writes
    the set asked for, saying which, and the sources' PSF metrics; the time model's plot."""
    from flows.cli import main
    from photref_core.prf.steps import load_prf_model
    from photref_core.simulate.fields import load_frames, simulate_field

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    sim = simulate_field(tmp_path / "field", "kepler", seed=4, n_frames=8, n_stars=40, size=64, drift=0.4)
    store, output = tmp_path / "s.zarr", tmp_path / "fluxes.fits"
    radii = [f"--{k.replace('_', '-')}={v}" for k, v in sim["prf_params"].items()]
    command = ["prf", str(store), str(Path(sim["paths"][0]).parent / "*.fits"), "--catalog", sim["catalog"]]
    model_output = tmp_path / "models.fits"
    command += ["--output", str(output), "--time-model", "--transform", "scale", *radii]
    command += ["--model-output", str(model_output)]
    command += ["--time-build-frames", "4", "--time-rounds", "2", "--perturbation", "--time-nknots", "6"]
    assert main(command) == 0
    assert "time model plot: " in capsys.readouterr().out
    assert Path(str(output).replace(".fits", "_time.png")).stat().st_size > 10_000
    with fits.open(output) as h:
        assert h[0].header["FLUXSET"] == "time" and h[0].header["TRANSFRM"] == "scale"
        fluxes, frames = Table(h["FLUXES"].data), Table(h["FRAMES"].data)
        sources = Table(h["SOURCES"].data)
    assert frames.colnames == ["frame_id", "time", "dx", "dy", "scale"]
    assert len(frames) == 8 and np.all(np.isfinite(frames["dx"]))

    import xarray as xr

    flux_group = f"prf/fluxes-{products_key(store)}"
    ds = xr.open_zarr(str(store), group=flux_group, consolidated=False)
    assert {"flux", "flux_time", "transform"} <= set(ds.data_vars)
    model = load_prf_model(str(store), ds.attrs["model_group"])
    assert model.time_model is not None and model.time_model.kind == "scale"
    pert = model.time_model.perturbation
    assert pert is not None and pert.nknots == 6 and pert.diagnostics["bins"] == 8  # one frame a bin
    # The sources' metrics: the stored model's, in the table and the store.
    metrics = model.get_psf_metrics()
    assert sources.colnames == [
        "source_id",
        "ra",
        "dec",
        "source_psf_fraction",
        "perturbed_ratio_mean",
        "perturbed_std",
    ]
    np.testing.assert_array_equal(sources["source_id"], model.source_ids)
    for name in ("source_psf_fraction", "perturbed_ratio_mean", "perturbed_std"):
        np.testing.assert_allclose(sources[name], getattr(metrics, name), rtol=1e-12)
    assert np.all(sources["perturbed_std"] > 0)
    flux, err, mask, wcs = load_frames(sim["paths"])  # in time order, as the store's slots
    jd = np.array([fits.getheader(p)["JD"] for p in sim["paths"]])
    direct = model.fit(flux, err, mask, wcs, times=jd, return_model=True)
    static = model.fit(flux, err, mask, wcs, time_model=False)
    slot = {
        str(f): k
        for k, f in enumerate(xr.open_zarr(str(store), group="prf", consolidated=False).frame_id.values)
    }
    rows = [slot[fits.getheader(p)["FRAMEID"]] for p in sim["paths"]]
    np.testing.assert_allclose(ds["flux_time"].values[rows], direct.flux, rtol=1e-9)
    np.testing.assert_allclose(ds["transform"].values[rows], direct.transform, atol=1e-12)
    np.testing.assert_allclose(ds["flux"].values[rows], static.flux, rtol=1e-9)
    first = fluxes[fluxes["frame_id"] == fits.getheader(sim["paths"][0])["FRAMEID"]]
    np.testing.assert_allclose(first["flux"], direct.flux[0], rtol=1e-9)
    # The model images are the time model's (transformed positions), frame by frame.
    with fits.open(model_output) as h:
        assert h[0].header["FLUXSET"] == "time"
        ids = [fits.getheader(p)["FRAMEID"] for p in sim["paths"]]
        for k, frame_id in enumerate(ids):
            (ext,) = [e for e in h[1:] if e.name == "MODEL" and e.header["FRAMEID"] == frame_id]
            scale = np.abs(direct.model[k]).max()
            np.testing.assert_allclose(ext.data, direct.model[k], rtol=1e-5, atol=1e-6 * scale)

    # The static set from the same (cached) run; --output-fluxes time without the model is refused.
    assert main(command + ["--output-fluxes", "static"]) == 0
    with fits.open(output) as h:
        assert h[0].header["FLUXSET"] == "static"
        np.testing.assert_allclose(Table(h["FLUXES"].data)["flux"][: len(first)], static.flux[0], rtol=1e-9)
    capsys.readouterr()
    plain = [c for c in command if c != "--time-model"]
    assert main(plain + ["--output-fluxes", "time"]) == 2
    assert "--output-fluxes time needs --time-model" in capsys.readouterr().err
    assert main(plain) == 2  # --perturbation without the transform it is applied after
    assert "--perturbation needs --time-model" in capsys.readouterr().err


def products_key(store) -> str:
    """The key of the one flux group of a store's PRF runs."""
    import zarr

    names = [
        n for n in zarr.open_group(str(store), path="prf", mode="r").group_keys() if n.startswith("fluxes-")
    ]
    assert len(names) == 1
    return names[0].removeprefix("fluxes-")
