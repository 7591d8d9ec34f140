"""kvstore's worker threads for bulk bytes: sized to the CPUs, usable again in a forked child."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading

import pytest

from kvstore import _workers
from kvstore._workers import ENV_THREADS, in_worker, worker_count
from kvstore.errors import InvalidInputError


def _thread_name() -> str:
    return threading.current_thread().name


def test_pool_has_twice_the_cpus_at_most_32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_THREADS, raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert worker_count() == min(32, 2 * cpus)


async def test_the_environment_sets_the_count_of_a_new_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_THREADS, "3")
    assert worker_count() == 3
    monkeypatch.setattr(_workers, "_pool", None)  # as in a process that has not used it yet
    names = await asyncio.gather(*(in_worker(_thread_name) for _ in range(12)))
    assert len(set(names)) <= 3
    _workers._workers().shutdown(wait=False)  # the process's own pool comes back when monkeypatch undoes


@pytest.mark.parametrize("bad", ["0", "-2", "four", "1.5"])
def test_a_bad_thread_count_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(ENV_THREADS, bad)
    with pytest.raises(InvalidInputError, match=ENV_THREADS):
        worker_count()


async def test_work_runs_on_kvstore_threads_and_raises_there() -> None:
    names = await asyncio.gather(*(in_worker(_thread_name) for _ in range(8)))
    assert all(n.startswith("kvstore-bytes") for n in names), names
    assert len(set(names)) <= worker_count()
    with pytest.raises(ZeroDivisionError):
        await in_worker(lambda: 1 // 0)


def _child(queue: multiprocessing.Queue[str]) -> None:
    queue.put(asyncio.run(asyncio.wait_for(in_worker(_thread_name), 30)))


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
async def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    await in_worker(_thread_name)  # the parent's pool exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    name = await asyncio.to_thread(queue.get, True, 60)
    child.join(30)
    assert child.exitcode == 0
    assert name.startswith("kvstore-bytes")
