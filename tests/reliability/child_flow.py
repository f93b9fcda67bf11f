"""Flow runs in child processes for the reliability tests, started from a pre-imported "zygote".

Importing Prefect, the flows, astropy, xarray and zarr costs about 6 s here, more than most flow runs. So
``python child_flow.py`` (PREFECT_API_URL set, the repository on PYTHONPATH) imports everything once, then
reads one JSON spec a line on stdin and forks a child per spec, answering with the child's pid on stdout.
The child installs its hooks, runs its flow and exits; the zygote reaps it and appends an ``exit`` event
(with the status as ``os.waitstatus_to_exitcode`` gives it: -9 after SIGKILL) to the child's events file.
The zygote has a single thread when it forks (nothing here starts one before), so forking is safe; it exits
when its stdin closes.

A spec::

    flow         "master" (flows.master_photref.build_master_photref) or "ingest" (flows.ingest.ingest_frames)
    kwargs       keyword arguments of the flow
    max_workers  threads of the task runner (default 2)
    events       file to which events are appended, one JSON object a line: started, lock-enter,
                 lock-acquired, lock-released, lock-refused, paused, finished, error, exit
    stdout, stderr  files that receive the child's output
    pause        where to stop and wait to be killed (the test sends SIGKILL once it sees "paused"):
                 {"kind": "zarr", "pattern": GLOB, "nth": N}   before the N-th write (zarr.Array.__setitem__)
                                                               into an array whose path matches GLOB
                 {"kind": "replace", "name": NAME}             before os.replace(..., <dir>/NAME)
                 {"kind": "partial-write", "name": NAME, "after_bytes": N}
                                                               once N bytes of the temporary file of NAME
                                                               are on disk (flushed and fsynced)
    hold_until   a path: once the run holds the store lock, wait until that file exists (keeps the lock)

On success the flow's return value is printed as ``RESULT <json>`` and the status is 0; on an exception
the child writes an ``error`` event with its type and message and exits with status 3. A pause that is
never killed ends the child with status 99 after ``pause_seconds`` (default 300): a broken test cannot hang.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import select
import sys
import threading
import time
import traceback


def write_event(path: str, kind: str, **info) -> None:
    line = json.dumps({"event": kind, "t": time.time(), "pid": os.getpid(), **info}, default=str)
    with open(path, "a") as stream:
        stream.write(line + "\n")


class Hooks:
    """Everything a child patches in itself before its flow runs."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.lock = threading.Lock()

    def event(self, kind: str, **info) -> None:
        with self.lock:
            write_event(self.spec["events"], kind, **info)

    def pause(self, where: str) -> None:
        self.event("paused", where=where)
        time.sleep(float(self.spec.get("pause_seconds", 300)))
        self.event("pause-timeout", where=where)
        os._exit(99)

    def install(self) -> None:
        import zarr

        from photref_core.store import lock as core_lock

        hooks, pause = self, self.spec.get("pause") or {}
        if pause.get("kind") == "zarr":
            real_setitem = zarr.Array.__setitem__
            count = [0]

            def count_and_pause(path):
                if fnmatch.fnmatchcase(path, pause["pattern"]):
                    with hooks.lock:
                        count[0] += 1
                        nth = count[0]
                    if nth == int(pause["nth"]):
                        hooks.pause(f"before zarr write #{nth} into {path}")

            def setitem(array, selection, value):
                count_and_pause(array.path)
                return real_setitem(array, selection, value)

            zarr.Array.__setitem__ = setitem

            # Result groups are written through the async API (photref_core.store.groups.write_group): the
            # same count, paused inside zarr's I/O loop (which stops every write of the process there).
            real_async_setitem = zarr.AsyncArray.setitem

            async def async_setitem(array, selection, value, *args, **kwargs):
                count_and_pause(array.path)
                return await real_async_setitem(array, selection, value, *args, **kwargs)

            zarr.AsyncArray.setitem = async_setitem
        elif pause.get("kind") == "replace":
            real_replace = os.replace

            def replace(src, dst, *args, **kwargs):
                if os.path.basename(os.fspath(dst)) == pause["name"]:
                    hooks.pause(f"before os.replace({src}, {dst})")
                return real_replace(src, dst, *args, **kwargs)

            os.replace = replace
        elif pause.get("kind") == "partial-write":
            real_fdopen = os.fdopen

            class PausingWriter(io.BufferedWriter):
                written = 0

                def write(self, data):
                    n = super().write(data)
                    self.written += n
                    if self.written >= int(pause["after_bytes"]):
                        self.flush()
                        os.fsync(self.fileno())
                        target = os.readlink(f"/proc/self/fd/{self.fileno()}")
                        hooks.pause(f"{self.written} bytes written into {target}")
                    return n

            def fdopen(fd, mode="r", *args, **kwargs):
                try:
                    target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    target = ""
                if "w" in mode and "b" in mode and target.startswith(f".{pause['name']}.tmp-"):
                    return PausingWriter(io.FileIO(fd, "wb", closefd=True))
                return real_fdopen(fd, mode, *args, **kwargs)

            os.fdopen = fdopen

        real_lock, held = core_lock.store_lock, [0]

        @contextlib.contextmanager
        def logged_lock(store, timeout=0.0, poll=0.2):
            hooks.event("lock-enter", store=str(store), timeout=timeout)
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(real_lock(store, timeout=timeout, poll=poll))
            except Exception as exc:
                hooks.event("lock-refused", error=type(exc).__name__, message=str(exc))
                raise
            with stack:  # the real lock is released after the "lock-released" event
                held[0] += 1
                hooks.event("lock-acquired", depth=held[0])
                try:
                    if held[0] == 1 and hooks.spec.get("hold_until"):
                        while not os.path.exists(hooks.spec["hold_until"]):
                            time.sleep(0.02)
                    yield
                finally:
                    held[0] -= 1
                    hooks.event("lock-released", depth=held[0] + 1)

        # The flows take the lock through store_run, which looks store_lock up in its module.
        core_lock.store_lock = logged_lock


def run_child(spec: dict) -> int:
    """The forked child: output to files, hooks, the flow. Returns the exit status."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(spec[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    import flows.ingest
    import flows.master_photref
    from flows.runners import make_task_runner

    hooks = Hooks(spec)
    hooks.install()
    flow = {"master": flows.master_photref.build_master_photref, "ingest": flows.ingest.ingest_frames}
    runner = make_task_runner(int(spec.get("max_workers", 2)))
    try:
        result = flow[spec["flow"]].with_options(task_runner=runner)(**spec["kwargs"])
    except Exception as exc:
        hooks.event("error", error=type(exc).__name__, message=str(exc))
        traceback.print_exc()
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    hooks.event("finished")
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0


def serve() -> None:
    import astropy.io.fits  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    import flows.ingest  # noqa: F401
    import flows.master_photref  # noqa: F401
    import photref_core.master.plots  # noqa: F401
    import photref_core.master.steps  # noqa: F401

    assert threading.active_count() == 1, f"threads before fork: {threading.enumerate()}"
    events: dict[int, str] = {}
    print("READY", flush=True)
    stdin_open = True
    while stdin_open or events:
        if stdin_open:
            ready, _, _ = select.select([sys.stdin], [], [], 0.02)
        else:
            ready = []
            time.sleep(0.02)
        if ready:
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
            elif line.strip():
                spec = json.loads(line)
                write_event(spec["events"], "started")
                pid = os.fork()
                if pid == 0:
                    status = 1
                    try:
                        status = run_child(spec)
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(status)
                events[pid] = spec["events"]
                print(pid, flush=True)
        while events:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            path = events.pop(pid, None)
            if path is not None:
                write_event(path, "exit", child=pid, status=os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    serve()
