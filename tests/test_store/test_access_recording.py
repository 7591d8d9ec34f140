"""Access recording: batches flushed by interval, by size and on close; the load path pays no request for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import kvstore
from kvstore.errors import StoreUnavailableError
from kvstore.formats.access import ACCESS_DIR, AccessRecord
from kvstore.formats.keys import chunk_keys, normalize_tokens
from kvstore.storage import open_object_store

CHUNK = 4
PROMPT = list(range(50, 66))  # 4 chunks


async def _records(url: str, opts: Any) -> list[AccessRecord]:
    backend = await open_object_store(url, opts)
    try:
        return [AccessRecord.from_msgpack(await backend.get(m.key)) async for m in backend.list(ACCESS_DIR + "/")]
    finally:
        await backend.close()


def _prefixes(spec: kvstore.ModelSpec, tokens: list[int]) -> list[int]:
    return sorted(int.from_bytes(k.digest[:8], "big") for k in chunk_keys(spec, normalize_tokens(tokens), CHUNK))


async def _until(check: Callable[[], bool]) -> None:
    """Wait (at most 10 s) for the store's background flusher to do what ``check`` observes."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the flusher did not get there in 10 s")


async def _saved(url: str, opts: Any, spec: kvstore.ModelSpec, kv: Any, tokens: list[int] = PROMPT) -> None:
    async with kvstore.open(url, storage_options=opts, chunk_tokens=CHUNK, record_access=False) as store:
        await store.save_prefix(spec, tokens, kv)


@pytest.mark.parametrize("backend", ["memory", "local", "moto"])
async def test_flushed_by_interval_with_the_hit_chunks(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _saved(url, opts, spec, make_kv(spec, len(PROMPT)))
    assert await _records(url, opts) == []
    async with kvstore.open(url, storage_options=opts, access_flush_interval=0.05) as store:
        assert (await store.load_prefix(spec, [*PROMPT, 1, 2])).num_tokens == len(PROMPT)
        await _until(lambda: store.stats().access_records_written == 1)
        [rec] = await _records(url, opts)  # written while the store is open, by the interval
    assert sorted(rec.keys.tolist()) == _prefixes(spec, PROMPT)
    assert rec.model_id == kvstore.formats.keys.model_id(spec)


@pytest.mark.parametrize("backend", ["memory"])
async def test_flushed_when_a_batch_is_full_and_on_close(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _saved(url, opts, spec, make_kv(spec, len(PROMPT)))
    async with kvstore.open(url, storage_options=opts, access_flush_interval=3600) as store:
        store._access.batch_entries = 3  # a 4-chunk hit fills a batch
        assert await store.lookup(spec, PROMPT) == len(PROMPT)
        await _until(lambda: store.stats().access_records_written == 1)
        store._access.batch_entries = 1000
        assert await store.lookup(spec, PROMPT[:8]) == 8
        await asyncio.sleep(0.05)
        assert store.stats().access_records_written == 1  # not full, interval far: waits for close()
    assert store.stats().access_records_written == 2
    records = await _records(url, opts)
    assert sorted(len(r.keys) for r in records) == [2, 4]


@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_a_crash_loses_only_the_unflushed_batch(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, len(PROMPT))
    other = list(range(900, 916))
    await _saved(url, opts, spec, kv)
    await _saved(url, opts, spec, kv, other)
    async with kvstore.open(url, storage_options=opts, access_flush_interval=3600) as store:
        await store.load_prefix(spec, PROMPT)
    crashed = await kvstore.open(url, storage_options=opts, access_flush_interval=3600)
    await crashed.load_prefix(spec, other)
    task = crashed._access._task  # the process dies: its flusher with it, close() never runs
    assert task is not None
    task.cancel()
    records = await _records(url, opts)
    assert [sorted(r.keys.tolist()) for r in records] == [_prefixes(spec, PROMPT)]
    async with kvstore.open(url, storage_options=opts, record_access=False) as store:
        assert (await store.load_prefix(spec, other)).num_tokens == len(other)  # data is never at stake


@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_the_load_path_makes_no_extra_request(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _saved(url, opts, spec, make_kv(spec, len(PROMPT)))
    counts = {}
    for record in (False, True):
        async with kvstore.open(url, storage_options=opts, record_access=record) as store:
            for _ in range(3):
                assert (await store.load_prefix(spec, PROMPT)).num_tokens == len(PROMPT)
                assert await store.lookup(spec, PROMPT) == len(PROMPT)
                async with store.load_prefix_layers(spec, PROMPT) as layers:
                    async for _ in layers:
                        pass
            ops = store.request_stats().operations
            counts[record] = {name: op.count for name, op in ops.items() if op.count}
    assert counts[True] == counts[False]
    assert counts[True]  # the loads did make requests


@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_a_failed_flush_is_counted_and_the_load_unaffected(
    store_url: Any,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    counting_store: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
) -> None:
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, len(PROMPT))
    await _saved(url, opts, spec, kv)
    counted = counting_store(await open_object_store(url, opts))
    real_put = counted.put

    async def put(key: str, data: bytes, *, create_only: bool = False) -> bool:
        if key.startswith(ACCESS_DIR + "/"):
            raise StoreUnavailableError("access records refused", url=url, operation="put", key=key)
        result: bool = await real_put(key, data, create_only=create_only)
        return result

    counted.put = put
    store = kvstore.KVStore(counted, kvstore.StoreOptions(chunk_tokens=CHUNK, access_flush_interval=0.02))
    try:
        hit = await store.load_prefix(spec, PROMPT)
        await _until(lambda: store.stats().access_flush_failures >= 2)  # retried at each interval
        assert_kv_equal(hit.kv, kv)
    finally:
        await store.close()  # the last flush fails too: counted, not raised
    stats = store.stats()
    assert stats.access_records_written == 0
    assert stats.access_flush_failures >= 3
    assert await _records(url, opts) == []
