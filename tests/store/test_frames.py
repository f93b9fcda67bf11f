"""The one frame planner (photref_core.store.frames.plan_frames) under the image rules, the code version
that enters every cache key, and the atomic writer's clean-up of killed writers' temporaries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photref_core import keys
from photref_core._atomic import atomic_write
from photref_core.ingest.images import (
    finalize_image_ingestion,
    ingest_image_batch,
    open_image_group,
    plan_image_ingestion,
)
from photref_core.store.schema import INGESTED, QUARANTINED


@pytest.fixture(scope="module")
def image_field(tmp_path_factory):
    from photref_core.simulate.images import simulate_images

    return simulate_images(
        tmp_path_factory.mktemp("planner"), n_frames=4, n_stars=8, size=48, min_separation=10, seed=3
    )


@pytest.fixture
def images(image_field, tmp_path):
    dst = tmp_path / "images"
    shutil.copytree(Path(image_field["catalog"]).parent, dst)
    return sorted((dst / "frames").glob("*.fits"))


def ingest(store, paths):
    plan = plan_image_ingestion(store, paths, frames_per_chunk=2)
    results = [r for batch in plan.batches for r in ingest_image_batch(store, batch)]
    finalize_image_ingestion(store, results)
    return plan


def states(store) -> dict[str, int]:
    group = open_image_group(store)
    return dict(zip(group["frame_path"][:].tolist(), group["frame_state"][:].tolist(), strict=True))


def test_second_image_with_an_ingested_frameid_is_quarantined(images, tmp_path):
    store = str(tmp_path / "field.zarr")
    ingest(store, images)
    twin = tmp_path / "twin.fits"
    shutil.copy(images[0], twin)  # same FRAMEID, another file
    plan = ingest(store, [*images, twin])
    assert str(twin) in plan.quarantined
    assert "already ingested from" in plan.quarantined[str(twin)]["reason"]
    assert str(images[0]) in plan.quarantined[str(twin)]["reason"]
    assert plan.n_frames == len(images)  # the twin took no slot
    assert states(store)[str(images[0])] == INGESTED  # the original keeps its slot and data


def test_any_oserror_on_an_image_quarantines_that_file(images, tmp_path, monkeypatch):
    store = str(tmp_path / "field.zarr")
    import photref_core.store.frames as frames

    real = frames.file_identity
    broken = str(images[1])

    def identity(path):
        if path == broken:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(frames, "file_identity", identity)
    plan = ingest(store, images)
    assert broken in plan.quarantined
    assert "Permission denied" in plan.quarantined[broken]["reason"]
    assert plan.n_to_ingest == len(images) - 1  # the other images are ingested


def test_unchanged_quarantined_image_is_not_read_again(images, tmp_path, monkeypatch):
    store = str(tmp_path / "field.zarr")
    bad = Path(images[2])
    bad.write_bytes(b"not a FITS file at all")
    plan = ingest(store, images)
    assert str(bad) in plan.quarantined
    import photref_core.ingest.images as core_images

    read = []
    real = core_images.read_image

    def counting(path, header_only=False):
        read.append(os.fspath(path))
        return real(path, header_only=header_only)

    monkeypatch.setattr(core_images, "read_image", counting)
    again = ingest(store, images)
    assert str(bad) not in read  # unchanged since it was quarantined: not opened
    assert str(bad) in again.skipped
    # Fixed (the file changes): tried again and ingested.
    shutil.copy(images[0], bad)
    with fits.open(bad, mode="update") as hdul:
        hdul[0].header["FRAMEID"] = "fixed-frame"
    fixed = ingest(store, images)
    assert str(bad) in read and str(bad) not in fixed.quarantined
    assert states(store)[str(bad)] == INGESTED


def test_image_gone_bad_is_quarantined_in_its_slot(images, tmp_path):
    store = str(tmp_path / "field.zarr")
    ingest(store, images)
    Path(images[3]).write_bytes(b"truncated")
    plan = ingest(store, images)
    assert str(images[3]) in plan.quarantined
    assert states(store)[str(images[3])] == QUARANTINED


def test_code_version_covers_every_subpackage(tmp_path, monkeypatch):
    core = tmp_path / "photref_core"
    (core / "prf").mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "prf" / "shape.py").write_text("X = 1\n")
    monkeypatch.setattr(keys, "_CORE", core)
    before = keys.code_version()
    (core / "prf" / "shape.py").write_text("X = 2\n")
    assert keys.code_version() != before
    # And the real package's version is made of every file below photref_core, subpackages included.
    monkeypatch.undo()
    real = Path(keys.__file__).parent
    assert any(p.parent != real for p in real.rglob("*.py"))


def test_atomic_write_removes_temporaries_of_dead_writers(tmp_path):
    target = tmp_path / "master.fits"
    # A writer process that dies between creating its temporary and renaming it.
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(child.stdout)
    stale = tmp_path / f".master.fits.tmp-{dead_pid}-abcdef"
    stale.write_bytes(b"half a file")
    other = tmp_path / f".other.fits.tmp-{dead_pid}-abcdef"
    other.write_bytes(b"not ours")
    atomic_write(target, lambda stream: stream.write(b"complete"))
    assert target.read_bytes() == b"complete"
    assert not stale.exists()
    assert other.exists()  # another file's temporary is left alone


def test_plan_keeps_good_images_when_every_other_is_bad(images, tmp_path):
    store = str(tmp_path / "field.zarr")
    Path(images[0]).write_bytes(b"junk")
    plan = ingest(store, images)
    assert plan.n_to_ingest == len(images) - 1
    group = open_image_group(store)
    assert np.count_nonzero(group["frame_state"][:] == INGESTED) == len(images) - 1
