"""A request must never leave behind a worker thread that writes into, or publishes from, the caller's buffers.

The backend here does its I/O in a worker thread that genuinely blocks
(``threading.Event``), as a stalled disk read does: cancelling the awaiting
coroutine does not stop it. A backend that works on the caller's buffers in its
thread (``reads_into_buffers``, ``writes_parts``: a local directory) is waited for
past the timeout; any other is given up and retried, but its late thread only
ever holds bytes of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

import pytest

from kvstore.errors import ObjectNotFoundError
from kvstore.storage import ObjectMeta, ObjectStore
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy

T = TypeVar("T")
TIMEOUT = 0.3
POLICY = RetryPolicy(attempts=2, base_delay=0, request_timeout=TIMEOUT, breaker_threshold=0)
DATA = bytes(range(256)) * 64  # 16 KiB
LATE = b"\xaa"  # what a given-up read's thread writes when it finally runs
REUSED = b"\x55"  # what the caller (another load, via the pool) puts in its buffers afterwards


class StallingStore(ObjectStore):
    """Objects in a dict; the first request's worker thread blocks until ``release`` is set."""

    def __init__(self, *, reads_into_buffers: bool) -> None:
        self.url = "stalling://"
        self.reads_into_buffers = reads_into_buffers
        self.writes_parts = reads_into_buffers  # like a local directory: reads into and writes from them
        self.objects: dict[str, bytes] = {"k": DATA}
        self.stalls = 1
        self.release = threading.Event()
        self.stalled_done = threading.Event()  # set when the stalled thread has finished its work
        self.calls = 0

    async def _in_thread(self, work: Callable[[bool], T]) -> T:
        """``work(late)`` in a worker thread; a stalled request's thread first blocks until ``release``."""
        self.calls += 1
        stall = self.stalls > 0
        self.stalls -= stall

        def run() -> T:
            if not stall:
                return work(False)
            assert self.release.wait(10)
            try:
                return work(True)
            finally:
                self.stalled_done.set()

        return await asyncio.to_thread(run)

    async def get_range_into(
        self, key: str, start: int, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        def read(late: bool) -> int:
            rest = memoryview(self.objects[key])[start:]
            filled = 0
            for buf in buffers:  # like preadv: straight into the buffers it was given
                n = min(len(buf), len(rest))
                buf[:n], rest = rest[:n], rest[n:]
                filled += n
            if then is not None:
                then(filled)
            return filled

        return await self._in_thread(read)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if key not in self.objects:
            raise ObjectNotFoundError(key)
        return await self._in_thread(lambda late: (LATE * end if late else self.objects[key])[start:end])

    async def get(self, key: str) -> bytes:
        return await self.get_range(key, 0, len(self.objects[key]))

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        def write(late: bool) -> bool:
            self.objects[key] = b"".join(parts)  # publish what the parts hold now
            return True

        return await self._in_thread(write)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        return await self.put_parts(key, [memoryview(data)], create_only=create_only)

    async def head(self, key: str) -> ObjectMeta | None:
        return ObjectMeta(key, len(self.objects[key]), None) if key in self.objects else None

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        for key, data in list(self.objects.items()):
            if key.startswith(prefix):
                yield ObjectMeta(key, len(data), None)

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.objects.pop(key, None)


async def _release_later(backend: StallingStore) -> None:
    """Let the stalled thread go well after the request's timeout."""
    await asyncio.sleep(TIMEOUT * 3)
    backend.release.set()


async def _finish(backend: StallingStore) -> None:
    backend.release.set()
    assert await asyncio.to_thread(backend.stalled_done.wait, 10), "the stalled thread never finished"


@pytest.mark.parametrize("reads_into_buffers", [True, False])
async def test_no_thread_writes_into_the_callers_buffers_after_a_read_returns(reads_into_buffers: bool) -> None:
    backend = StallingStore(reads_into_buffers=reads_into_buffers)
    store = ResilientObjectStore(backend, POLICY)
    dest = bytearray(len(DATA))
    halves = [memoryview(dest)[: len(DATA) // 2], memoryview(dest)[len(DATA) // 2 :]]
    checked: list[bytes] = []
    release = asyncio.ensure_future(_release_later(backend))
    filled = await store.get_range_into("k", 0, halves, then=lambda n: checked.append(bytes(dest[:n])))
    assert (filled, bytes(dest), checked) == (len(DATA), DATA, [DATA])  # checked in place, as the caller asked
    assert store.stats.timeouts == 1
    if reads_into_buffers:  # its thread writes into the caller's buffers: waited for, its late answer used
        assert backend.stalled_done.is_set()
        assert (backend.calls, store.stats.retries) == (1, 0)
    else:  # given up and retried: the late thread only ever held bytes of its own
        assert (backend.calls, store.stats.retries) == (2, 1)
    dest[:] = REUSED * len(dest)  # the caller is done: the buffers go to another load
    await release
    await _finish(backend)
    assert bytes(dest) == REUSED * len(dest)  # nothing landed in them afterwards
    assert checked == [DATA]


@pytest.mark.parametrize("reads_into_buffers", [True, False])
async def test_no_thread_publishes_the_callers_buffers_after_a_write_returns(reads_into_buffers: bool) -> None:
    backend = StallingStore(reads_into_buffers=reads_into_buffers)
    store = ResilientObjectStore(backend, POLICY)
    src = bytearray(DATA)
    release = asyncio.ensure_future(_release_later(backend))
    assert await store.put_parts("w", [memoryview(src)[:100], memoryview(src)[100:]])
    assert backend.objects["w"] == DATA
    assert store.stats.timeouts == 1
    assert backend.stalled_done.is_set() == reads_into_buffers
    src[:] = REUSED * len(src)  # the caller's buffers go back to the pool and are reused
    await release
    await _finish(backend)
    assert backend.objects["w"] == DATA  # a late write published the request's own bytes, if any


async def test_the_caller_can_still_cancel_a_read_waited_for_past_its_timeout() -> None:
    backend = StallingStore(reads_into_buffers=True)
    store = ResilientObjectStore(backend, POLICY)
    read = asyncio.ensure_future(store.get_range_into("k", 0, [memoryview(bytearray(len(DATA)))]))
    await asyncio.sleep(TIMEOUT * 2)
    assert not read.done()  # past its timeout, waiting for the thread
    read.cancel()  # the caller's own deadline: a cancelled load never reuses its buffers (LayerStream)
    with pytest.raises(asyncio.CancelledError):
        await read
    await _finish(backend)


@pytest.mark.parametrize("reads_into_buffers", [True, False])
async def test_no_thread_writes_into_the_callers_buffers_after_a_planned_read_returns(
    reads_into_buffers: bool,
) -> None:
    """``get_planned`` (a chunk's head, then its layers into the caller's buffers) is held to the same rule."""
    backend = StallingStore(reads_into_buffers=reads_into_buffers)
    store = ResilientObjectStore(backend, POLICY)
    dest = bytearray(len(DATA) - 16)
    release = asyncio.ensure_future(_release_later(backend))
    _, filled = await store.get_planned("k", 16, lambda first: (16, [memoryview(dest)]))
    assert (filled, bytes(dest)) == (len(dest), DATA[16:])
    assert store.stats.timeouts == 1
    dest[:] = REUSED * len(dest)
    await release
    await _finish(backend)
    assert bytes(dest) == REUSED * len(dest)
