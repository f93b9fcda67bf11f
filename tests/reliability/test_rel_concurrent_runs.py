"""Flow runs on the same store at once (child processes): one holds the store, the others refuse or wait.

A first master flow run (A) takes the store lock and keeps it (it waits for a release file while holding
it, so the overlap is certain, not a race). Meanwhile three more runs start on the same store:

* B, an ingestion run with the default ``lock_timeout=0``: refuses at once with the StoreError of
  ``store_lock``, naming the store and A's pid;
* C, an ingestion run with ``lock_timeout=1.5``: waits 1.5 s, then refuses with the same message;
* D, a master run with ``lock_timeout=None`` (wait for ever): waits, and runs once A has released the lock.

Afterwards the store equals the clean run's store and both masters equal the clean master.
"""

from __future__ import annotations

import re
import socket

from relutil import assert_same_master, assert_same_store, wait_for

REFUSAL = (
    r"{store}: another photref run is using this store \(pid {pid} on {host} since [0-9T:-]+\); "
    r"wait for it to finish or pass a lock timeout"
)


def test_concurrent_runs_refuse_or_wait_and_never_corrupt_the_store(launcher, rel_field, clean_run, tmp_path):
    store = tmp_path / "store.zarr"
    release = tmp_path / "release"
    common = dict(store=str(store), catalog=rel_field.catalog, frames=rel_field.frames)
    a = launcher.start(
        {
            "flow": "master",
            "kwargs": dict(common, output=str(tmp_path / "a.fits"), plots=False),
            "hold_until": str(release),
        },
        tmp_path,
        "A",
    )
    b = c = d = None
    try:
        a.wait_event("lock-acquired", timeout=240)
        b = launcher.start({"flow": "ingest", "kwargs": dict(common)}, tmp_path, "B")
        c = launcher.start({"flow": "ingest", "kwargs": dict(common, lock_timeout=1.5)}, tmp_path, "C")
        d = launcher.start(
            {
                "flow": "master",
                "kwargs": dict(common, output=str(tmp_path / "d.fits"), plots=False, lock_timeout=None),
            },
            tmp_path,
            "D",
        )
        assert b.wait() == 3, b.tail()
        assert c.wait() == 3, c.tail()
        d.wait_event("lock-enter", timeout=120)
        assert a.returncode is None and d.returncode is None, "A or D ended while A held the lock"
        assert d.event("lock-acquired") is None, "D got the lock while A held it"
    finally:
        release.touch()
        for child in (a, b, c, d):
            if child is not None and child.returncode is None:
                wait_for(lambda child=child: child.returncode is not None, 240)

    expected = REFUSAL.format(store=re.escape(str(store)), pid=a.pid, host=re.escape(socket.gethostname()))
    for child, timeout in ((b, 0.0), (c, 1.5)):
        refused = child.event("lock-refused")
        assert refused is not None and refused["error"] == "StoreError", child.tail()
        assert re.fullmatch(expected, refused["message"]), refused["message"]
        assert f"ERROR StoreError: {refused['message']}" in child.stderr
        waited = refused["t"] - child.event("lock-enter")["t"]  # the lock polls every 0.2 s
        assert timeout <= waited < timeout + 3.0, (
            f"{child.name} waited {waited:.2f} s, lock_timeout {timeout}"
        )

    assert a.returncode == 0, a.tail()
    assert d.returncode == 0, d.tail()
    released = max(e["t"] for e in a.events() if e["event"] == "lock-released")
    assert d.event("lock-acquired")["t"] >= released, "D ran while A still held the lock"
    assert d.result()["frames_included"] == len(rel_field.frames)

    assert_same_store(store, clean_run.store_snapshot)
    assert_same_master(tmp_path / "a.fits", clean_run.master, differ=("STORE",))
    assert_same_master(tmp_path / "d.fits", clean_run.master, differ=("STORE",))
