"""The gauges and counters of work behind the calls: write-back queue, prefetch buffer, circuit breaker."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import torch
from _scrape import exposition, samples, value

import kvstore
from kvstore.errors import StoreUnavailableError
from kvstore.metrics import StoreCollector
from kvstore.storage import LocalObjectStore, ObjectMeta
from kvstore.storage.instrumented import InstrumentedObjectStore
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy

CT = 16
SPEC = kvstore.ModelSpec("metrics", "v1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def _kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(n, 2, 8).half(), torch.randn(n, 2, 8).half()) for _ in range(2)]


class HeldPuts(LocalObjectStore):
    """Every write waits for ``gate``: a background save stays queued until the test lets it go."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        await self.gate.wait()
        return await super().put(key, data, create_only=create_only)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        await self.gate.wait()
        return await super().put_parts(key, parts, create_only=create_only)


class FailingHeads(LocalObjectStore):
    batches_heads = False  # every HEAD goes through head() (and fails)

    async def head(self, key: str) -> ObjectMeta | None:
        raise StoreUnavailableError(f"injected: 503 on HEAD {key}")


def _scrape(store: kvstore.KVStore) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return samples(exposition(StoreCollector(store)))


async def test_writeback_queue_gauges_follow_a_background_save(tmp_path: Path) -> None:
    backend = HeldPuts(str(tmp_path / "kv"))
    store = kvstore.KVStore(InstrumentedObjectStore(backend), kvstore.StoreOptions(chunk_tokens=CT))
    async with store:
        handle = await store.save_prefix(SPEC, list(range(40)), _kv(40), wait=False)
        s = _scrape(store)
        assert value(s, "kvstore_writeback_queue_bytes") == SPEC.bytes_per_token * 40
        assert value(s, "kvstore_writeback_queue_saves") == 1
        backend.gate.set()
        assert (await handle).chunks_written == 3
        await store.flush()
        s = _scrape(store)
        assert value(s, "kvstore_writeback_queue_bytes") == 0
        assert value(s, "kvstore_writeback_queue_saves") == 0
        assert value(s, "kvstore_chunks_written_total") == 3


async def test_prefetch_counters_and_buffer(tmp_path: Path) -> None:
    url = str(tmp_path / "kv")
    a, b = list(range(40)), list(range(100, 140))
    async with kvstore.open(url, chunk_tokens=CT) as writer:
        await writer.save_prefix(SPEC, a, _kv(40))
        await writer.save_prefix(SPEC, b, _kv(40))
    budget = SPEC.bytes_per_token * 40  # room for one of the two prompts
    options = kvstore.StoreOptions(chunk_tokens=CT, prefetch_budget=budget)
    async with kvstore.KVStore(InstrumentedObjectStore(LocalObjectStore(url)), options) as store:
        assert (await store.prefetch(SPEC, a)).num_tokens == 40
        s = _scrape(store)
        assert value(s, "kvstore_prefetches_started_total") == 1
        assert value(s, "kvstore_prefetch_buffer_prefetches") == 1
        assert value(s, "kvstore_prefetch_buffer_bytes") == budget  # the finished result's size

        prefetch_b = store.prefetch(SPEC, b)  # evicts a's
        store.prefetch(SPEC, list(range(200, 300)))  # larger than the whole budget: not started
        await prefetch_b
        s = _scrape(store)
        assert value(s, "kvstore_prefetches_started_total") == 2
        assert value(s, "kvstore_prefetches_dropped_total") == 2
        assert value(s, "kvstore_prefetch_buffer_prefetches") == 1

        assert (await store.load_prefix(SPEC, b)).num_tokens == 40  # joins the prefetch
        s = _scrape(store)
        assert value(s, "kvstore_prefetches_claimed_total") == 1
        assert value(s, "kvstore_prefetch_buffer_prefetches") == 0
        assert value(s, "kvstore_prefetch_buffer_bytes") == 0


async def test_circuit_breaker_state_and_request_errors(tmp_path: Path) -> None:
    policy = RetryPolicy(attempts=1, breaker_threshold=2, breaker_cooldown=600)
    backend = ResilientObjectStore(InstrumentedObjectStore(FailingHeads(str(tmp_path / "kv"))), policy)
    async with kvstore.KVStore(backend, kvstore.StoreOptions(chunk_tokens=CT)) as store:
        tokens = list(range(CT))  # one chunk: one HEAD per lookup
        assert value(_scrape(store), "kvstore_circuit_breaker_open") == 0
        for _ in range(3):
            assert await store.lookup(SPEC, tokens) == 0  # failed open
        s = _scrape(store)
    assert value(s, "kvstore_circuit_breaker_open") == 1
    assert value(s, "kvstore_circuit_breaker_opened_total") == 1
    assert value(s, "kvstore_requests_total", operation="head") == 2  # the third never left: circuit open
    assert value(s, "kvstore_request_errors_total", operation="head") == 2
    assert value(s, "kvstore_request_failures_total") == 2
    assert value(s, "kvstore_circuit_breaker_rejected_total") == 1
    assert value(s, "kvstore_read_errors_total") == 3
