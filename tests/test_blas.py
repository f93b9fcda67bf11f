"""photref_core.blas: one BLAS thread limit shared by concurrent holders, restored by the last one."""

from __future__ import annotations

import os
import threading

import numpy as np
from threadpoolctl import threadpool_info

from photref_core.blas import blas_threads, threads_per_task


def blas_thread_counts() -> set[int]:
    np.ones(2) @ np.ones(2)  # numpy's BLAS is loaded
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_concurrent_holders_keep_the_limit_until_the_last_leaves():
    before = blas_thread_counts()
    assert before
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with blas_threads(1):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with blas_threads(1):
            second_in.set()
            first_out.wait(10)
            seen["after first left"] = blas_thread_counts()  # still limited: the first did not restore
        seen["after both left"] = blas_thread_counts()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["after first left"] == {1}
    assert seen["after both left"] == before
    with blas_threads(None):  # no limit asked: the library's setting
        assert blas_thread_counts() == before


def test_threads_per_task_shares_the_cores():
    cores = os.cpu_count() or 1
    assert threads_per_task(1) == cores
    assert threads_per_task(cores) == 1
    assert threads_per_task(10 * cores) == 1
    assert threads_per_task(0) == cores
