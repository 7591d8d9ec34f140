"""Every object request of one store: under its concurrency limit, and counted by kind."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.hits import HitCounters
from kvstore.probing import find_first_missing
from kvstore.storage import ObjectStore
from kvstore.storage.base import ObjectMeta, ReadPlan

__all__ = ["Counters", "PriorityLimit", "Requests"]


@dataclass(slots=True)
class Counters(HitCounters):
    """A store's cumulative counters; ``KVStore.stats()`` snapshots them."""

    saves: int = 0
    loads: int = 0
    lookups: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    chunks_loaded: int = 0
    chunks_damaged: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    requests_get: int = 0
    requests_put: int = 0
    requests_head: int = 0
    requests_delete: int = 0
    requests_list: int = 0
    read_errors: int = 0
    loads_timed_out: int = 0
    reads_shared: int = 0
    cache_rereads: int = 0
    access_records_written: int = 0
    access_flush_failures: int = 0
    access_entries_dropped: int = 0


class PriorityLimit:
    """A semaphore that admits waiters by (priority, arrival): lower priorities first, FIFO among equals.

    A layer-pipelined load reads every chunk's layer 0 at priority 0 and the rest
    at priority 1, so with the store's limit busy the first layer of every chunk
    is served before any chunk's later layers: layer 0 completes early.
    """

    def __init__(self, value: int) -> None:
        self._free = value
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self, priority: int = 0) -> _Slot:
        """``async with limit(priority):`` holds one slot for the block."""
        return _Slot(self, priority)

    async def _acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as it was cancelled: pass the slot on
                self._release()
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class _Slot:
    """One use of a ``PriorityLimit`` (a class, not a generator: this runs for every request)."""

    __slots__ = ("_limit", "_priority")

    def __init__(self, limit: PriorityLimit, priority: int) -> None:
        self._limit = limit
        self._priority = priority

    async def __aenter__(self) -> None:
        await self._limit._acquire(self._priority)

    async def __aexit__(self, *exc: object) -> None:
        self._limit._release()


class Requests:
    """The store's backend behind one FIFO request limit (``max_concurrency``), with counts per kind.

    Requests wait in the order they were made (within a priority, see
    ``PriorityLimit``), so a load gets them served in the order it makes them.
    """

    def __init__(self, backend: ObjectStore, max_concurrency: int, counters: Counters) -> None:
        self.backend = backend
        self.counters = counters
        self._limit = PriorityLimit(max_concurrency)

    @property
    def reads_into_buffers(self) -> bool:
        return self.backend.reads_into_buffers

    @property
    def writes_parts(self) -> bool:
        return self.backend.writes_parts

    async def head(self, key: str) -> ObjectMeta | None:
        async with self._limit():
            self.counters.requests_head += 1
            return await self.backend.head(key)

    async def head_many(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        """One concurrent round of HEADs; a backend that batches them answers in one request (counted per key)."""
        if not self.backend.batches_heads:
            return list(await asyncio.gather(*(self.head(k) for k in keys)))
        async with self._limit():
            self.counters.requests_head += len(keys)
            return await self.backend.head_many(keys)

    async def find_first_missing(
        self, keys: Sequence[str], *, probe: bool = True
    ) -> tuple[int, dict[int, ObjectMeta | None]]:
        """The first missing object of a chain of ``keys`` and what was HEADed.

        With ``probe`` a long chain is probed (``kvstore.probing``), except on a
        backend that batches HEADs (one request answers every key); else every
        key is HEADed in one round.
        """
        if probe and not self.backend.batches_heads:
            return await find_first_missing(self.head_many, keys)
        metas = await self.head_many(keys)
        return next((i for i, m in enumerate(metas) if m is None), len(keys)), dict(enumerate(metas))

    async def get(self, key: str) -> bytes:
        async with self._limit():
            self.counters.requests_get += 1
            return await self.backend.get(key)

    async def get_range(self, key: str, start: int, end: int, *, priority: int = 0) -> bytes:
        async with self._limit(priority):
            self.counters.requests_get += 1
            return await self.backend.get_range(key, start, end)

    async def get_range_into(
        self,
        key: str,
        start: int,
        buffers: Sequence[memoryview],
        *,
        then: Callable[[int], None] | None = None,
        priority: int = 0,
    ) -> int:
        async with self._limit(priority):
            self.counters.requests_get += 1
            return await self.backend.get_range_into(key, start, buffers, then=then)

    async def get_planned(
        self,
        key: str,
        head: int,
        plan: ReadPlan,
        *,
        then: Callable[[int], None] | None = None,
    ) -> tuple[bytes, int]:
        async with self._limit():
            self.counters.requests_get += 1
            return await self.backend.get_planned(key, head, plan, then=then)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        async with self._limit():
            self.counters.requests_put += 1
            return await self.backend.put(key, data, create_only=create_only)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        async with self._limit():
            self.counters.requests_put += 1
            return await self.backend.put_parts(key, parts, create_only=create_only)

    async def list(self, prefix: str) -> list[ObjectMeta]:
        async with self._limit():
            self.counters.requests_list += 1
            return [m async for m in self.backend.list(prefix)]

    async def delete(self, keys: Sequence[str]) -> None:
        async with self._limit():
            self.counters.requests_delete += 1
            await self.backend.delete(keys)
