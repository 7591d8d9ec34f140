"""Cache tiers in front of the source of truth: host memory (LRU, byte budget) and a local disk.

Chunks are content-addressed and immutable, so a copy of an object is as good as
the original: reads try host memory, then the disk tier, then the source, and
fill the faster tiers on the way back. Writes go through to the source first
(it stays the source of truth), then to the disk tier. Checksums are verified
above this layer on every read, whichever tier served it, so a damaged cache copy
is caught like damage at the source.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kvstore.errors import KVStoreError, ObjectNotFoundError
from kvstore.storage.base import ObjectMeta, ObjectStore

__all__ = ["TierStats", "TieredObjectStore"]


@dataclass(slots=True)
class TierStats:
    """Reads served per tier, their bytes and summed latency (seconds)."""

    memory_hits: int = 0
    memory_bytes: int = 0
    disk_hits: int = 0
    disk_bytes: int = 0
    disk_seconds: float = 0.0
    source_reads: int = 0
    source_bytes: int = 0
    source_seconds: float = 0.0
    memory_evictions: int = 0


class _MemoryLRU:
    def __init__(self, budget: int, stats: TierStats) -> None:
        self.budget = budget
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._stats = stats

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.budget:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._items[key] = data
        self.used += len(data)
        while self.used > self.budget:
            _, evicted = self._items.popitem(last=False)
            self.used -= len(evicted)
            self._stats.memory_evictions += 1

    def discard(self, key: str) -> None:
        data = self._items.pop(key, None)
        if data is not None:
            self.used -= len(data)


class TieredObjectStore(ObjectStore):
    """``source`` behind a host-memory LRU of ``memory_budget`` bytes and an optional ``disk`` store."""

    reads_into_buffers = True
    """Loads use ``get_range_into`` (the base copy from a cached object, checksummed in the worker thread)."""

    def __init__(self, source: ObjectStore, *, memory_budget: int = 0, disk: ObjectStore | None = None) -> None:
        self.source = source
        self.disk = disk
        self.url = source.url
        self.tier_stats = TierStats()
        self._memory = _MemoryLRU(memory_budget, self.tier_stats) if memory_budget > 0 else None

    async def get(self, key: str) -> bytes:
        s = self.tier_stats
        if self._memory is not None and (data := self._memory.get(key)) is not None:
            s.memory_hits += 1
            s.memory_bytes += len(data)
            return data
        if self.disk is not None:
            t0 = time.perf_counter()
            with contextlib.suppress(ObjectNotFoundError):
                data = await self.disk.get(key)
                s.disk_hits += 1
                s.disk_bytes += len(data)
                s.disk_seconds += time.perf_counter() - t0
                self._remember(key, data)
                return data
        t0 = time.perf_counter()
        data = await self.source.get(key)
        s.source_reads += 1
        s.source_bytes += len(data)
        s.source_seconds += time.perf_counter() - t0
        self._remember(key, data)
        if self.disk is not None:
            await self._fill_disk(key, data)
        return data

    def _remember(self, key: str, data: bytes) -> None:
        if self._memory is not None:
            self._memory.put(key, data)

    async def _fill_disk(self, key: str, data: bytes) -> None:
        """Best effort: a full or failing cache disk must not fail a read from the source."""
        assert self.disk is not None
        with contextlib.suppress(KVStoreError):
            await self.disk.put(key, data)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        written = await self.source.put(key, data, create_only=create_only)
        if written and self.disk is not None:
            await self._fill_disk(key, data)
        if self._memory is not None:
            self._memory.discard(key)
        return written

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        written = await self.source.put_parts(key, parts, create_only=create_only)
        if written and self.disk is not None:
            with contextlib.suppress(KVStoreError):
                await self.disk.put_parts(key, parts)
        if self._memory is not None:
            self._memory.discard(key)
        return written

    async def head(self, key: str) -> ObjectMeta | None:
        """Existence is the source's answer: retirement, GC and repair act there."""
        return await self.source.head(key)

    def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        return self.source.list(prefix)

    async def delete(self, keys: Sequence[str]) -> None:
        await self.source.delete(keys)
        if self._memory is not None:
            for key in keys:
                self._memory.discard(key)
        if self.disk is not None:
            with contextlib.suppress(KVStoreError):
                await self.disk.delete(keys)

    async def close(self) -> None:
        try:
            await self.source.close()
        finally:
            if self.disk is not None:
                await self.disk.close()
