"""Request counts, bytes and latency histograms per operation, around any ObjectStore.

``kvstore.open`` stacks this directly over the backend, under retries and cache
tiers, so it times what actually goes to the store: every attempt of a request
is one observation, and reads served by a cache tier are none. The histogram has
fixed buckets (``LATENCY_BUCKETS``) so that snapshots of any two stores, or of
one store at two times, can be subtracted and summed like Prometheus histograms.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvstore.errors import StoreUnavailableError
from kvstore.storage.base import ObjectMeta, ObjectStore, ReadPlan
from kvstore.storage.resilient import ResilientObjectStore
from kvstore.storage.tiers import TieredObjectStore

__all__ = ["LATENCY_BUCKETS", "OPERATIONS", "InstrumentedObjectStore", "OperationStats", "storage_layers"]

T = TypeVar("T")

OPERATIONS = ("get", "get_range", "put", "head", "list", "delete")
"""The operations timed. ``get_range_into`` and ``get_planned`` count as ``get_range``, ``put_parts`` as
``put``: the same requests, read into or written from several buffers."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Upper bounds (seconds) of the latency buckets: local disks to a slow S3 with the 30 s request timeout."""


@dataclass(frozen=True, slots=True)
class OperationStats:
    """One operation's requests: how many, how they ended, their bytes and latency.

    ``bucket_counts[i]`` counts requests that took at most ``LATENCY_BUCKETS[i]``
    seconds and more than the bound before it; the last entry counts those over
    the largest bound. ``errors`` are requests the store failed or refused
    (``StoreUnavailableError``); a missing object is an answer, not an error.
    ``cancelled`` requests (a per-request timeout, an abandoned load) are not in
    the histogram: they did not end. ``bytes`` are the object bytes moved (gets
    and puts).
    """

    count: int = 0
    errors: int = 0
    cancelled: int = 0
    seconds: float = 0.0
    bytes: int = 0
    bucket_counts: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS) + 1)


class _Recorder:
    """The mutable counters behind one operation's ``OperationStats``."""

    __slots__ = ("buckets", "bytes", "cancelled", "count", "errors", "seconds")

    def __init__(self) -> None:
        self.count = self.errors = self.cancelled = self.bytes = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def observe(self, elapsed: float) -> None:
        self.count += 1
        self.seconds += elapsed
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1

    def ended(self, exc: BaseException, elapsed: float) -> None:
        """A request that raised ``exc``: cancelled (timed out, or its caller stopped waiting), failed, or answered."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.cancelled += 1
            return
        if isinstance(exc, StoreUnavailableError):
            self.errors += 1
        self.observe(elapsed)  # a failure, a definite answer (not found) or our own bug: the request did end

    def snapshot(self) -> OperationStats:
        return OperationStats(self.count, self.errors, self.cancelled, self.seconds, self.bytes, tuple(self.buckets))


class InstrumentedObjectStore(ObjectStore):
    """``inner`` with every request counted and timed per operation (see ``operation_stats``)."""

    def __init__(self, inner: ObjectStore, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner = inner
        self.url = inner.url
        self.reads_into_buffers = inner.reads_into_buffers
        self.has_cache_tiers = inner.has_cache_tiers
        self.batches_heads = inner.batches_heads
        self.writes_parts = inner.writes_parts
        self._clock = clock
        self._recorders = {op: _Recorder() for op in OPERATIONS}

    def operation_stats(self) -> dict[str, OperationStats]:
        """A snapshot per operation, every operation of ``OPERATIONS`` present."""
        return {op: rec.snapshot() for op, rec in self._recorders.items()}

    async def _timed(self, op: str, request: Awaitable[T]) -> T:
        rec = self._recorders[op]
        start = self._clock()
        try:
            result = await request
        except BaseException as exc:
            rec.ended(exc, self._clock() - start)
            raise
        rec.observe(self._clock() - start)
        return result

    async def get(self, key: str) -> bytes:
        data = await self._timed("get", self.inner.get(key))
        self._recorders["get"].bytes += len(data)
        return data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        data = await self._timed("get_range", self.inner.get_range(key, start, end))
        self._recorders["get_range"].bytes += len(data)
        return data

    async def get_range_into(
        self, key: str, start: int, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        filled = await self._timed("get_range", self.inner.get_range_into(key, start, buffers, then=then))
        self._recorders["get_range"].bytes += filled
        return filled

    async def get_planned(
        self,
        key: str,
        head: int,
        plan: ReadPlan,
        *,
        then: Callable[[int], None] | None = None,
    ) -> tuple[bytes, int]:
        """One ``get_range`` where the backend reads into buffers (a local file), else the base's two."""
        if not self.inner.reads_into_buffers:  # the base get_planned: a get_range and a get_range_into, each timed
            return await super().get_planned(key, head, plan, then=then)
        first, filled = await self._timed("get_range", self.inner.get_planned(key, head, plan, then=then))
        self._recorders["get_range"].bytes += len(first) + filled
        return first, filled

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        written = await self._timed("put", self.inner.put(key, data, create_only=create_only))
        if written:
            self._recorders["put"].bytes += len(data)
        return written

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        written = await self._timed("put", self.inner.put_parts(key, parts, create_only=create_only))
        if written:
            self._recorders["put"].bytes += sum(p.nbytes for p in parts)
        return written

    async def head(self, key: str) -> ObjectMeta | None:
        return await self._timed("head", self.inner.head(key))

    async def head_many(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        """Timed one by one, or for a batching backend (a local directory) as one call counted per key,
        each with its share of the call's time."""
        if not self.inner.batches_heads:
            return await super().head_many(keys)
        rec = self._recorders["head"]
        start = self._clock()
        try:
            found = await self.inner.head_many(keys)
        except BaseException as exc:
            rec.ended(exc, self._clock() - start)
            raise
        share = (self._clock() - start) / max(1, len(keys))
        for _ in keys:
            rec.observe(share)
        return found

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        """Timed from the call to the end of the listing: one request however many pages.

        The time includes the caller's work between entries (a listing is a
        stream, never held in memory here); a listing left unfinished counts as cancelled.
        """
        rec = self._recorders["list"]
        start = self._clock()
        try:
            async for meta in self.inner.list(prefix):
                yield meta
        except BaseException as exc:
            rec.ended(exc, self._clock() - start)
            raise
        rec.observe(self._clock() - start)

    async def delete(self, keys: Sequence[str]) -> None:
        await self._timed("delete", self.inner.delete(keys))

    async def drop_cached(self, key: str) -> None:
        await self.inner.drop_cached(key)

    async def close(self) -> None:
        await self.inner.close()


def storage_layers(store: ObjectStore) -> list[ObjectStore]:
    """``store`` and every layer under it, outermost first, following the wrapper types ``kvstore.open`` stacks."""
    layers = [store]
    while True:
        top = layers[-1]
        if isinstance(top, (InstrumentedObjectStore, ResilientObjectStore)):
            layers.append(top.inner)
        elif isinstance(top, TieredObjectStore):
            layers.append(top.source)
        else:
            return layers
