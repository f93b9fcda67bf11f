"""A crash while the master is being written never leaves a partial master, and never harms the old one.

A store and a master from an earlier run are in place. A master flow run with another fit threshold (so
the products are written again) runs in a child process that stops inside ``write_master`` and is killed
there with SIGKILL:

* ``partial-temp``: after 2 FITS blocks of the temporary file are on disk (the new master half written);
* ``before-rename``: with the temporary file complete and fsynced, just before ``os.replace``.

The old master must be byte for byte what it was, the only file under the master's name; a watcher thread
opens the master all along and must always find a whole file. A re-run then writes the new master.
"""

from __future__ import annotations

import os
import shutil

import pytest
from astropy.io import fits
from relutil import FileWatcher, check_complete_fits, master_hdu_names


@pytest.mark.parametrize(
    "pause",
    [
        pytest.param(
            {"kind": "partial-write", "name": "master.fits", "after_bytes": 2 * 2880}, id="partial-temp"
        ),
        pytest.param({"kind": "replace", "name": "master.fits"}, id="before-rename"),
    ],
)
def test_crash_inside_write_master_keeps_the_old_master(launcher, rel_field, clean_run, tmp_path, pause):
    from flows.master_photref import build_master_photref

    store, output = tmp_path / "store.zarr", tmp_path / "out" / "master.fits"
    shutil.copytree(clean_run.store, store)
    output.parent.mkdir()
    shutil.copyfile(clean_run.master, output)
    old = output.read_bytes()
    names = master_hdu_names(clean_run.n_photometries)
    kwargs = dict(
        store=str(store),
        catalog=rel_field.catalog,
        output=str(output),
        frames=rel_field.frames,
        plots=False,
        params={"fit_outlier_threshold": 2.5},  # JSON for the child; the flow validates it
    )
    with FileWatcher({output: names}) as watcher:
        child = launcher.start({"flow": "master", "kwargs": kwargs, "pause": pause}, tmp_path, "writer")
        try:
            where = child.wait_event("paused", timeout=240)["where"]
        finally:
            status = child.kill()
        assert status == -9, child.tail()
        assert output.read_bytes() == old, f"the old master changed (killed {where})"
        check_complete_fits(output, names)

        # The temporary file is there (hidden, under another name), and it is the killed writer's.
        listing = sorted(os.listdir(output.parent))
        assert [n for n in listing if n.startswith("master.fits")] == ["master.fits"], listing
        temps = [n for n in listing if n.startswith(f".master.fits.tmp-{child.pid}-")]
        assert len(temps) == 1, listing
        temp = output.parent / temps[0]
        if pause["kind"] == "partial-write":
            assert temp.stat().st_size < len(old), "the temporary file should be partial"
            with pytest.raises(Exception):  # noqa: B017 - any failure: a half file must not open whole
                check_complete_fits(temp, names)
        else:
            check_complete_fits(temp, names)

        products = build_master_photref(**kwargs)
    assert not watcher.errors, watcher.errors[:3]
    assert watcher.seen[str(output)] > 0
    check_complete_fits(products["master"], names)
    with fits.open(output) as hdul:
        assert hdul[0].header["OUTL_THR"] == 2.5
    with fits.open(clean_run.master) as hdul:
        assert hdul[0].header["OUTL_THR"] == 3.0
