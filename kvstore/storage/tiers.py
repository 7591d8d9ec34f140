"""Cache tiers in front of the source of truth: host memory (LRU, byte budget) and a local disk.

Only objects that never change once written (``cacheable``: a chunk's data and
metadata, which are content-addressed) are cached; records that can be
rewritten or deleted (root, model and retirement records, tail markers)
always go to the source, so a change there is seen at once. Reads of cacheable
objects try host memory, then the disk tier, then the source, and fill the
faster tiers on the way back. Writes go through to the source first (it stays
the source of truth), then to the disk tier.

Checksums are verified above this layer. A copy that fails them is not damage
at the source: the reader calls ``drop_cached`` and reads again, which reaches
the source; only damage in the source's own bytes warrants a repair there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from kvstore.storage.base import ObjectMeta, ObjectStore
from kvstore.storage.disk_tier import DiskTier

__all__ = ["TierStats", "TieredObjectStore"]


@dataclass(slots=True)
class TierStats:
    """Reads served per tier, their bytes and summed latency (seconds); the disk tier's size and evictions."""

    memory_hits: int = 0
    memory_bytes: int = 0
    disk_hits: int = 0
    disk_bytes: int = 0
    disk_seconds: float = 0.0
    source_reads: int = 0
    source_bytes: int = 0
    source_seconds: float = 0.0
    memory_evictions: int = 0
    disk_used_bytes: int = 0
    """Bytes of cached copies the disk tier holds (``disk_cache_bytes`` bounds it)."""
    disk_evictions: int = 0


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
    """``source`` behind a host-memory LRU of ``memory_budget`` bytes and an optional disk tier.

    ``cacheable(key)`` says which objects may be served from a tier: those that
    never change once written. Every other key goes to the source.
    """

    reads_into_buffers = True
    """Loads read ranges (``get_range_into``: the base copy from a cached object, checksummed in the worker thread)."""
    has_cache_tiers = True

    def __init__(
        self,
        source: ObjectStore,
        *,
        cacheable: Callable[[str], bool],
        memory_budget: int = 0,
        disk: DiskTier | None = None,
    ) -> None:
        self.source = source
        self.batches_heads = source.batches_heads
        self.writes_parts = source.writes_parts
        self.disk = disk
        self.url = source.url
        self._cacheable = cacheable
        self._stats = TierStats()
        self._memory = _MemoryLRU(memory_budget, self._stats) if memory_budget > 0 else None
        self._drops = 0
        """Bumped by every drop: a read that began before one does not fill the tiers with what it found."""

    @property
    def tier_stats(self) -> TierStats:
        """The counters, with the disk tier's size and evictions as of now."""
        if self.disk is not None:
            self._stats.disk_used_bytes = self.disk.used
            self._stats.disk_evictions = self.disk.evictions
        return self._stats

    async def get(self, key: str) -> bytes:
        return await self._read(key, None)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """A range of a cacheable object: the whole object is fetched and cached on a miss, the range returned."""
        return await self._read(key, (start, end))

    async def _read(self, key: str, span: tuple[int, int] | None) -> bytes:
        if not self._cacheable(key):
            return await self._from_source(key, span)
        s = self._stats
        if self._memory is not None and (data := self._memory.get(key)) is not None:
            data = _cut(data, span)
            s.memory_hits += 1
            s.memory_bytes += len(data)
            return data
        drops = self._drops
        if self.disk is not None:
            t0 = time.perf_counter()
            found = await self._from_disk(self.disk, key, span, drops)
            if found is not None:
                s.disk_hits += 1
                s.disk_bytes += len(found)
                s.disk_seconds += time.perf_counter() - t0
                return found
        data = await self._from_source(key, None)  # whole: it fills the tiers
        if drops == self._drops:
            self._remember(key, data)
            if self.disk is not None:
                await self.disk.put(key, [memoryview(data)])
        return _cut(data, span)

    async def _from_disk(self, disk: DiskTier, key: str, span: tuple[int, int] | None, drops: int) -> bytes | None:
        """The disk tier's copy: whole when memory is there to keep it, else just ``span`` (no bytes read twice)."""
        if span is not None and self._memory is None:
            return await disk.get_range(key, *span)
        found = await disk.get(key)
        if found is None:
            return None
        if drops == self._drops:
            self._remember(key, found)
        return _cut(found, span)

    async def _from_source(self, key: str, span: tuple[int, int] | None) -> bytes:
        s = self._stats
        t0 = time.perf_counter()
        data = await (self.source.get(key) if span is None else self.source.get_range(key, *span))
        s.source_reads += 1
        s.source_bytes += len(data)
        s.source_seconds += time.perf_counter() - t0
        return data

    def _remember(self, key: str, data: bytes) -> None:
        if self._memory is not None:
            self._memory.put(key, data)

    async def drop_cached(self, key: str) -> None:
        """Forget every cached copy of ``key``: the next read goes to the source and refills the tiers."""
        self._drops += 1
        await self._forget([key])

    async def _forget(self, keys: Sequence[str]) -> None:
        if self._memory is not None:
            for key in keys:
                self._memory.discard(key)
        if self.disk is not None:
            await self.disk.drop(keys)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        written = await self.source.put(key, data, create_only=create_only)
        await self._after_write(key, [memoryview(data)] if written else None)
        return written

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        written = await self.source.put_parts(key, parts, create_only=create_only)
        await self._after_write(key, parts if written else None)
        return written

    async def _after_write(self, key: str, parts: Sequence[memoryview] | None) -> None:
        """A write at the source replaces any cached copy: memory forgets it, the disk tier takes the new bytes."""
        if self._memory is not None:
            self._memory.discard(key)
        if parts is not None and self.disk is not None and self._cacheable(key):
            await self.disk.put(key, parts)

    async def head(self, key: str) -> ObjectMeta | None:
        """Existence is the source's answer: retirement, GC and repair act there."""
        return await self.source.head(key)

    async def head_many(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        return await self.source.head_many(keys)

    def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        return self.source.list(prefix)

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete at the source, then every cached copy (never the way to drop only a copy: see ``drop_cached``)."""
        await self.source.delete(keys)
        self._drops += 1
        await self._forget(keys)

    async def close(self) -> None:
        await self.source.close()


def _cut(data: bytes, span: tuple[int, int] | None) -> bytes:
    return data if span is None else data[span[0] : span[1]]
