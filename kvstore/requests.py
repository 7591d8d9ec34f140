"""Every object request of one store: under its concurrency limit, and counted by kind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.storage import ObjectStore
from kvstore.storage.base import ObjectMeta

__all__ = ["Counters", "Requests"]


@dataclass(slots=True)
class Counters:
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


class Requests:
    """The store's backend behind one FIFO request limit (``max_concurrency``), with counts per kind.

    Requests wait in the order they were made, so a load that creates its
    requests layer-major (or chunk by chunk) gets them served in that order.
    """

    def __init__(self, backend: ObjectStore, max_concurrency: int, counters: Counters) -> None:
        self.backend = backend
        self.counters = counters
        self._limit = asyncio.Semaphore(max_concurrency)

    @property
    def reads_into_buffers(self) -> bool:
        return self.backend.reads_into_buffers

    async def head(self, key: str) -> ObjectMeta | None:
        async with self._limit:
            self.counters.requests_head += 1
            return await self.backend.head(key)

    async def get(self, key: str) -> bytes:
        async with self._limit:
            self.counters.requests_get += 1
            return await self.backend.get(key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        async with self._limit:
            self.counters.requests_get += 1
            return await self.backend.get_range(key, start, end)

    async def get_range_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        async with self._limit:
            self.counters.requests_get += 1
            return await self.backend.get_range_into(key, start, buffers)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        async with self._limit:
            self.counters.requests_put += 1
            return await self.backend.put(key, data, create_only=create_only)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        async with self._limit:
            self.counters.requests_put += 1
            return await self.backend.put_parts(key, parts, create_only=create_only)

    async def list(self, prefix: str) -> list[ObjectMeta]:
        async with self._limit:
            self.counters.requests_list += 1
            return [m async for m in self.backend.list(prefix)]

    async def delete(self, keys: Sequence[str]) -> None:
        async with self._limit:
            self.counters.requests_delete += 1
            await self.backend.delete(keys)
