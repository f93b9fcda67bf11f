"""What the Prefect UI shows, read back through the running server's API: run and task-run names, artifact
keys per field, the contents of the summaries and tables, the ``quarantined`` tag (issue 26)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.artifacts import (
    INGESTION_SUMMARY,
    MASTER_SUMMARY,
    MASTER_TABLE,
    NIGHTLY_SUMMARY,
    PRF_SUMMARY,
    PRF_TABLE,
    QUARANTINE_TAG,
    image_markdown,
    round_sig,
)
from photref_core.master.parameters import MasterParameters
from photref_core.store.schema import store_url
from tasks.naming import (
    MASTER_SHORT_NAMES,
    PRF_SHORT_NAMES,
    artifact_key,
    changed_parameters,
    field_slug,
    format_value,
    frame_range,
    master_changes,
    prf_changes,
)

# Prefect's own task-run names are "<task name>-<3 hex digits>"; ours never end that way.
PREFECT_DEFAULT_NAME = re.compile(r"-[0-9a-f]{3}$")
BARE_HASH = re.compile(r"[0-9a-f]{8,}")


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


def flow_run(run_id):
    return _api(lambda client: client.read_flow_run(run_id))


def run_tree(run_id) -> list:
    """The flow run and every subflow run below it."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs, frontier = [flow_run(run_id)], [run_id]
    while frontier:

        async def children(client, ids=tuple(frontier)):
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=list(ids)))
            )

        found = _api(children)
        runs += found
        frontier = [r.id for r in found]
    return runs


def task_run_names(run_ids) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(client):
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(run_ids)))
        )
        return [r.name for r in runs]

    return _api(read)


def latest_artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read(client):
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )
        return found[0] if found else None

    return _api(read)


def table_rows(artifact) -> list[dict]:
    return artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)


def assert_named_by_us(names) -> None:
    for name in names:
        assert not PREFECT_DEFAULT_NAME.search(name), name
        assert not BARE_HASH.search(name), name


@pytest.fixture
def field(small_field, tmp_path):
    dst = tmp_path / "night"
    shutil.copytree(Path(small_field.catalog).parent, dst)
    return dst


def test_naming_helpers():
    assert changed_parameters({"fit_outlier_threshold": 4.0, "outlier_threshold": 5.0}, *_master()) == "thr=4"
    assert (
        changed_parameters({"rejection_units": "stddev", "fit_terms": "O1{x}"}, *_master())
        == "terms=O1{x} units=stddev"
    )
    assert changed_parameters({}, *_master()) == ""
    assert master_changes(MasterParameters(fit_outlier_threshold=4.0)) == "thr=4"
    assert master_changes(MasterParameters().model_dump()) == ""

    from photref_core.prf.parameters import PRFParameters

    assert prf_changes(PRFParameters()) == ""
    assert prf_changes(PRFParameters(rmax=1.1, time_model=True, time_mask=[True, False])) == (
        "rmax=1.1 time=yes time_mask=[2]"
    )
    assert set(PRF_SHORT_NAMES) <= set(PRFParameters.__dataclass_fields__)
    assert (format_value(0.125), format_value(None), format_value(True), format_value(np.ones(3))) == (
        "0.125",
        "none",
        "yes",
        "[3]",
    )
    assert (frame_range([8, 9, 10, 11]), frame_range([3]), frame_range([1, 4])) == (
        "8-11",
        "3",
        "1-4 (2 frames)",
    )
    a, b = field_slug("/data/a/field.zarr"), field_slug("/data/b/field.zarr")
    assert a.startswith("field-zarr-") and b.startswith("field-zarr-") and a != b
    # Prefect's rule for artifact keys: lower-case letters, digits and dashes.
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key(MASTER_SUMMARY, "s3://Bucket/My Field_2.zarr/"))
    assert (round_sig(0.0123456), round_sig(123456.7), round_sig(3), np.isnan(round_sig(float("nan")))) == (
        0.01235,
        123500.0,
        3,
        True,
    )


def _master():
    from photref_core.master.parameters import MASTER_DEFAULTS

    return MASTER_DEFAULTS, MASTER_SHORT_NAMES


def test_large_images_are_embedded_shrunk(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(1)
    path = tmp_path / "noise.png"
    mpimg.imsave(path, rng.random((800, 800, 3)))  # noise: a PNG that does not compress, ~1.5 MB
    assert path.stat().st_size > 300_000
    text = image_markdown(str(path), max_bytes=300_000)
    import base64

    data = base64.b64decode(text.split("base64,", 1)[1].split(")", 1)[0])
    assert len(data) <= 300_000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in text and "file://" not in text


def test_master_names_keys_and_contents(prefect_server, field, tmp_path):
    from flows.master_photref import build_master_photref

    store = tmp_path / "a" / "field.zarr"
    frames = str(field / "frames" / "*.fits")
    state = build_master_photref(
        store=str(store),
        catalog=str(field / "catalog.fits"),
        output=str(tmp_path / "a" / "master.fits"),
        frames=[frames],
        params=MasterParameters(fit_outlier_threshold=4.0),
        return_state=True,
    )
    products = state.result()
    run_id = state.state_details.flow_run_id
    runs = run_tree(run_id)
    assert sorted(r.name for r in runs) == ["ingest field.zarr", "master field.zarr thr=4"]
    assert products["written_by"] == {"id": str(run_id), "name": "master field.zarr thr=4"}
    assert products["ingestion"]["ingested_now"] == 40 and not products["cached"]

    names = task_run_names([r.id for r in runs])
    assert {
        "statistics field.zarr",
        "scatter fit field.zarr thr=4",
        "write master.fits",
        "plan field.zarr (40 files)",
        "finalize field.zarr",
        "new frames? field.zarr",
        "check statistics result",
    } <= set(names), names
    assert any(n.startswith("ingest frames 0-") for n in names), names
    assert_named_by_us(names)

    url = store_url(store)
    summary = latest_artifact(artifact_key(MASTER_SUMMARY, url))
    assert summary is not None and summary.flow_run_id == run_id
    text = summary.data
    # What the ingestion did, the parameters asked for, the plots embedded (not file links).
    assert "* ingestion: 40 ingested now, 0 unchanged (skipped), 0 quarantined now" in text
    assert "rejection at 5 meddev around the median" in text
    assert "rejection beyond 4 x the median residual" in text
    assert "source blocks of" in text
    assert text.count("data:image/png;base64,") == len(products["plots"]) == 2
    assert "file://" not in text and "Warning" not in text

    rows = table_rows(latest_artifact(artifact_key(MASTER_TABLE, url)))
    assert len(rows) == 3
    assert list(rows[0])[:8] == [
        "phot",
        "measured",
        "enough",
        "in fit",
        "rejected",
        "in master",
        "rms dex",
        "fits",
    ]
    assert [k for k in rows[0] if k.startswith("c[")] == [
        "c[1]",
        "c[phot_g_mean_mag]",
        "c[phot_g_mean_mag^2]",
    ]
    for row in rows:
        for value in row.values():
            if isinstance(value, float) and value:
                digits = f"{abs(value):e}".split("e")[0].rstrip("0").replace(".", "")
                assert len(digits) <= 4, row

    # A second field, in another directory but also called field.zarr, keeps its own keys.
    store_b = tmp_path / "b" / "field.zarr"
    build_master_photref(
        store=str(store_b),
        catalog=str(field / "catalog.fits"),
        output=str(tmp_path / "b" / "master.fits"),
        frames=[frames],
    )
    key_b = artifact_key(MASTER_SUMMARY, store_url(store_b))
    assert key_b != artifact_key(MASTER_SUMMARY, url)
    assert latest_artifact(artifact_key(MASTER_SUMMARY, url)).flow_run_id == run_id
    assert str(tmp_path / "b" / "master.fits") in latest_artifact(key_b).data


def test_nightly_shows_quarantines_and_names_the_run_of_an_unchanged_master(prefect_server, field, tmp_path):
    from flows.nightly import NightlySettings, nightly_master

    bad = field / "frames" / "zz_broken.fits"
    bad.write_bytes(b"this is not a FITS file")
    settings = NightlySettings(
        store=str(tmp_path / "night.zarr"),
        catalog=str(field / "catalog.fits"),
        frames_glob=str(field / "frames" / "*.fits"),
        output=str(tmp_path / "master.fits"),
    )
    state = nightly_master(settings=settings, return_state=True)
    products = state.result()
    night = flow_run(state.state_details.flow_run_id)
    assert night.name.startswith("nightly ") and night.name.endswith(" night.zarr")
    assert QUARANTINE_TAG in night.tags
    tree = run_tree(night.id)
    by_name = {r.name.split(" ")[0]: r for r in tree}
    assert {"nightly", "master", "ingest"} == set(by_name)
    assert QUARANTINE_TAG in by_name["ingest"].tags and QUARANTINE_TAG in by_name["master"].tags

    url = store_url(settings.store)
    summary = latest_artifact(artifact_key(NIGHTLY_SUMMARY, url)).data
    assert "Warning: 1 file(s) quarantined by this run" in summary
    assert "zz_broken.fits" in summary
    assert "* ingestion: 40 ingested now, 0 unchanged (skipped), 1 quarantined now" in summary
    for kind in (INGESTION_SUMMARY, MASTER_SUMMARY):
        text = latest_artifact(artifact_key(kind, url)).data
        assert "Warning: 1 file(s) quarantined" in text and "zz_broken.fits" in text, kind

    # The same night again: nothing new, the master is served from the cache; the summary says so in one
    # line, naming (and linking) the run that wrote the master.
    state2 = nightly_master(settings=settings, return_state=True)
    assert state2.result()["cached"]
    again = latest_artifact(artifact_key(NIGHTLY_SUMMARY, url))
    assert again.flow_run_id == state2.state_details.flow_run_id
    writer = products["written_by"]
    assert writer["name"] == "master night.zarr"
    assert again.data.startswith("Master `master.fits` of `night.zarr` unchanged since run ")
    assert f"[{writer['name']}](" in again.data and writer["id"] in again.data
    assert "\n" not in again.data
    assert QUARANTINE_TAG not in flow_run(state2.state_details.flow_run_id).tags


@pytest.fixture(scope="module")
def image_field(tmp_path_factory):
    from photref_core.simulate.images import simulate_images

    return simulate_images(
        tmp_path_factory.mktemp("ui-images"), n_frames=10, n_stars=30, size=160, min_separation=24, seed=5
    )


def test_prf_names_and_artifacts(prefect_server, image_field, tmp_path):
    from flows.prf import solve_prf
    from photref_core.prf.parameters import PRFParameters

    images = [str(p) for p in image_field["paths"]]
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"not an image")
    store = tmp_path / "pix.zarr"
    state = solve_prf(
        store=str(store),
        images=[*images, str(bad)],
        catalog=str(image_field["catalog"]),
        output=str(tmp_path / "fluxes.fits"),
        params=PRFParameters(rmax=1.1, refine_iterations=0),
        frames_per_chunk=4,
        return_state=True,
    )
    products = state.result()
    run = flow_run(state.state_details.flow_run_id)
    assert run.name == "prf pix.zarr rmax=1.1 refine_iterations=0"
    assert QUARANTINE_TAG in run.tags
    names = set(task_run_names([run.id]))
    assert {"fit frames 0-3", "fit frames 4-7", "fit frames 8-9"} <= names, names
    assert {"finalize images pix.zarr", "flux arrays pix.zarr", "write fluxes.fits"} <= names, names
    assert 'shape model r 0.1-1.1" knots 10x15' in names, names
    assert_named_by_us(names)

    url = store_url(store)
    summary = latest_artifact(artifact_key(PRF_SUMMARY, url)).data
    assert "data:image/png;base64," in summary and "file://" not in summary
    assert "![fluxes_prf.png](data:image/png" in summary and "![fluxes_chi.png](data:image/png" in summary
    chi2 = products["residuals"]["robust_chi2_per_dof"]
    assert f"source pixels {products['residuals']['chi2_per_dof']:.4g}, robust {chi2:.4g}" in summary
    assert "Warning: 1 image(s) quarantined" in summary and "broken.fits" in summary
    figures = {r["figure"]: r["value"] for r in table_rows(latest_artifact(artifact_key(PRF_TABLE, url)))}
    assert figures["frames"] == 10 and figures["stars"] == 30
    assert 0 < figures["median flux_err/flux"] < 0.1
    assert figures["median flux_err/flux"] == round_sig(products["median_relative_error"])
    assert figures["flag low coverage"] + figures["flag solve failed"] >= products["flagged"] >= 0
    assert figures["images quarantined now"] == 1
    assert figures["robust chi^2/dof (reference frame)"] == round_sig(chi2) and chi2 > 0


def test_progress_shows_a_terminal_bar_and_the_artifact(prefect_server):
    """A command run from a terminal shows the fan-out's progress there too; the artifact ends at 100 %."""
    import io

    from prefect import flow
    from rich.console import Console

    from flows.progress import Progress

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=100)
    key = artifact_key("test-progress", "/data/bar.zarr")

    @flow
    def fan_out() -> bool:
        with Progress(3, key, "Ingesting 3 frames into bar.zarr", console=console) as progress:
            for _ in range(3):
                progress.advance(1)
        quiet = Progress(2, key, "no terminal")  # stderr is not a terminal under pytest: no bar
        quiet.finish()
        return quiet._bar is None

    assert fan_out()
    text = stream.getvalue()
    assert "Ingesting 3 frames into bar.zarr" in text and "3/3" in text
    assert float(latest_artifact(key).data) == 100.0
