"""InstrumentedObjectStore: what it counts, times and how it classifies each way a request ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import torch

import kvstore
from kvstore.errors import ObjectNotFoundError, StoreUnavailableError
from kvstore.storage import LocalObjectStore, ObjectMeta, ObjectStore
from kvstore.storage.instrumented import (
    LATENCY_BUCKETS,
    OPERATIONS,
    InstrumentedObjectStore,
    OperationStats,
    storage_layers,
)
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy
from kvstore.storage.tiers import TieredObjectStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Scripted(ObjectStore):
    """``inner`` whose requests take ``delay`` seconds of the fake clock, fail with ``error`` or never end."""

    def __init__(self, inner: ObjectStore, clock: FakeClock) -> None:
        self.inner, self.url, self.clock = inner, inner.url, clock
        self.delay = 0.0
        self.error: Exception | None = None
        self.stall = False

    async def _run(self) -> None:
        if self.stall:
            await asyncio.Event().wait()
        self.clock.now += self.delay
        if self.error is not None:
            raise self.error

    async def get(self, key: str) -> bytes:
        await self._run()
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        await self._run()
        return await self.inner.put(key, data, create_only=create_only)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        await self._run()
        return await self.inner.put_parts(key, parts, create_only=create_only)

    async def head(self, key: str) -> ObjectMeta | None:
        await self._run()
        return await self.inner.head(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        async for meta in self.inner.list(prefix):
            await self._run()
            yield meta

    async def delete(self, keys: Sequence[str]) -> None:
        await self._run()
        await self.inner.delete(keys)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[InstrumentedObjectStore, Scripted, FakeClock]:
    clock = FakeClock()
    scripted = Scripted(LocalObjectStore(str(tmp_path)), clock)
    return InstrumentedObjectStore(scripted, clock=clock), scripted, clock


def _bucket_of(seconds: float) -> int:
    return next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))


async def test_latency_lands_in_its_bucket_and_the_sum(
    stores: tuple[InstrumentedObjectStore, Scripted, FakeClock],
) -> None:
    timed, scripted, clock = stores
    delays = [0.0005, LATENCY_BUCKETS[0], 0.002, 0.7, 31.0]
    for delay in delays:
        scripted.delay, clock.now = delay, 0.0  # elapsed is exactly the delay (no float rounding at a bound)
        await timed.head("nothing")
    head = timed.operation_stats()["head"]
    assert head.count == len(delays)
    assert head.seconds == pytest.approx(sum(delays))
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    for delay in delays:
        expected[_bucket_of(delay)] += 1
    assert list(head.bucket_counts) == expected
    assert expected[0] == 2  # a bound is inclusive (Prometheus' le)
    assert expected[-1] == 1  # past the largest bound: the +Inf bucket
    assert set(timed.operation_stats()) == set(OPERATIONS)
    assert timed.operation_stats()["get"] == OperationStats()


async def test_bytes_are_counted_per_direction(stores: tuple[InstrumentedObjectStore, Scripted, FakeClock]) -> None:
    timed, _, _ = stores
    assert await timed.put("a", b"x" * 10)
    assert not await timed.put("a", b"y" * 99, create_only=True)  # nothing written: no bytes
    assert await timed.put_parts("b", [memoryview(b"abc"), memoryview(b"defg")])
    assert not await timed.put_parts("b", [memoryview(b"zz")], create_only=True)
    assert await timed.get("a") == b"x" * 10
    assert await timed.get_range("a", 2, 5) == b"xxx"
    buf = bytearray(5)
    assert await timed.get_range_into("b", 2, [memoryview(buf)]) == 5
    ops = timed.operation_stats()
    assert (ops["put"].count, ops["put"].bytes) == (4, 10 + 7)
    assert (ops["get"].count, ops["get"].bytes) == (1, 10)
    assert (ops["get_range"].count, ops["get_range"].bytes) == (2, 3 + 5)
    await timed.delete(["a", "b"])
    assert timed.operation_stats()["delete"].count == 1


async def test_a_missing_object_is_an_answer_and_a_failure_is_an_error(
    stores: tuple[InstrumentedObjectStore, Scripted, FakeClock],
) -> None:
    timed, scripted, _ = stores
    scripted.delay = 0.02
    with pytest.raises(ObjectNotFoundError):
        await timed.get("missing")
    scripted.error = StoreUnavailableError("503 SlowDown")
    with pytest.raises(StoreUnavailableError):
        await timed.get("missing")
    get = timed.operation_stats()["get"]
    assert (get.count, get.errors, get.cancelled) == (2, 1, 0)
    assert get.seconds == pytest.approx(0.04)  # errors took time too: they are in the histogram


async def test_requests_cut_by_the_retry_timeout_are_cancelled_not_timed(
    stores: tuple[InstrumentedObjectStore, Scripted, FakeClock],
) -> None:
    timed, scripted, _ = stores
    scripted.stall = True
    retrying = ResilientObjectStore(timed, RetryPolicy(attempts=2, request_timeout=0.01, base_delay=0.0))
    with pytest.raises(StoreUnavailableError):
        await retrying.head("k")
    head = timed.operation_stats()["head"]
    assert (head.cancelled, head.count, sum(head.bucket_counts)) == (2, 0, 0)
    assert retrying.stats.timeouts == 2


async def test_a_listing_is_one_request_timed_to_its_end(
    stores: tuple[InstrumentedObjectStore, Scripted, FakeClock],
) -> None:
    timed, scripted, _ = stores
    for key in ("p/a", "p/b", "p/c"):
        await timed.put(key, b"1")
    scripted.delay = 0.3  # per entry
    assert sorted([m.key async for m in timed.list("p/")]) == ["p/a", "p/b", "p/c"]
    listed = timed.operation_stats()["list"]
    assert listed.count == 1
    assert listed.seconds == pytest.approx(0.9)
    listing = timed.list("p/")
    async for _ in listing:
        break
    await listing.aclose()  # type: ignore[attr-defined]
    assert timed.operation_stats()["list"].cancelled == 1


async def test_open_stacks_it_right_over_the_backend(tmp_path: Path) -> None:
    async with kvstore.open(str(tmp_path / "kv"), memory_cache_bytes=1 << 20) as store:
        layers = storage_layers(store._backend)
        assert [type(x) for x in layers] == [
            TieredObjectStore,
            ResilientObjectStore,
            InstrumentedObjectStore,
            LocalObjectStore,
        ]
        await store.lookup(kvstore.ModelSpec("m", "v", 1, 1, 4, torch.float16), [1, 2, 3])
        assert isinstance(layers[2], InstrumentedObjectStore)
        assert layers[2].operation_stats()["head"].count >= 1


async def test_a_planned_read_is_one_request_where_the_backend_reads_into_buffers(tmp_path: Path) -> None:
    local = LocalObjectStore(str(tmp_path))
    await local.put("obj", b"HEAD" + b"x" * 12)

    def plan(head: bytes) -> tuple[int, list[memoryview]]:
        assert head == b"HEAD"
        return 4, [memoryview(bytearray(12))]

    direct = InstrumentedObjectStore(local)  # a local file: head and body in one worker-thread hop
    assert await direct.get_planned("obj", 4, plan) == (b"HEAD", 12)
    ranged = direct.operation_stats()["get_range"]
    assert (ranged.count, ranged.bytes) == (1, 16)
    clock = FakeClock()
    split = InstrumentedObjectStore(Scripted(local, clock), clock=clock)  # no reads into buffers: two requests
    assert await split.get_planned("obj", 4, plan) == (b"HEAD", 12)
    ranged = split.operation_stats()["get_range"]
    assert (ranged.count, ranged.bytes) == (2, 16)
