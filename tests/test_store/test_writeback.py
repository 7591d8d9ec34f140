"""Write-back: save_prefix(wait=False) returns after the copy, is readable at once, bounded, and never loses errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import kvstore
from kvstore.errors import StoreUnavailableError, WriteBackError
from kvstore.storage import ObjectMeta, ObjectStore, open_object_store
from kvstore.store import KVStore, StoreOptions


class GatedPuts(ObjectStore):
    """Holds every data-object PUT until ``gate`` is set; can fail them instead."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.reads_into_buffers = inner.reads_into_buffers
        self.gate = asyncio.Event()
        self.fail = False
        self.puts = 0

    async def _pass(self, key: str) -> None:
        if "/c/" in key:  # a data object
            await self.gate.wait()
            if self.fail:
                raise StoreUnavailableError(f"injected failure on {key}")
        self.puts += 1

    async def get(self, key: str) -> bytes:
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self.inner.get_range(key, start, end)

    async def get_range_into(self, key: str, start: int, buffers: Sequence[memoryview], **kw: Any) -> int:
        return await self.inner.get_range_into(key, start, buffers, **kw)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        await self._pass(key)
        return await self.inner.put(key, data, create_only=create_only)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        await self._pass(key)
        return await self.inner.put_parts(key, parts, create_only=create_only)

    async def head(self, key: str) -> ObjectMeta | None:
        return await self.inner.head(key)

    def list(self, prefix: str) -> Any:
        return self.inner.list(prefix)

    async def delete(self, keys: Sequence[str]) -> None:
        await self.inner.delete(keys)


CHUNK = 16


async def _gated(tmp_path: Any, **options: Any) -> tuple[KVStore, GatedPuts]:
    async with kvstore.open(str(tmp_path / "kv"), chunk_tokens=CHUNK):
        pass  # the root record, so that kvstore.open finds the store later
    backend = GatedPuts(await open_object_store(str(tmp_path / "kv")))
    return KVStore(backend, StoreOptions(chunk_tokens=CHUNK, **options)), backend


async def _saving_in_background(
    tmp_path: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> tuple[Any, list[int], list[Any], KVStore, GatedPuts, Any]:
    """A 40-token save(wait=False) whose upload waits at the gate; the caller's tensors zeroed at once after it."""
    spec = make_spec()
    tokens = list(range(40))
    kv = make_kv(spec, 40)
    expected = [(k.clone(), v.clone()) for k, v in kv]
    store, backend = await _gated(tmp_path)
    handle = await asyncio.wait_for(store.save_prefix(spec, tokens, kv, wait=False), 10)
    for k, v in kv:  # the caller reuses its buffers: the saved copy must not change
        k.zero_()
        v.zero_()
    return spec, tokens, expected, store, backend, handle


async def test_background_save_returns_at_once_and_is_readable_before_the_upload(
    tmp_path: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    spec, tokens, expected, store, backend, handle = await _saving_in_background(tmp_path, make_spec, make_kv)
    assert not handle.done()
    assert await store.lookup(spec, tokens) == 40
    hit = await store.load_prefix(spec, [*tokens, 7])
    assert hit.num_tokens == 40
    assert_kv_equal(hit.kv, expected)
    # Mid-chunk divergence is cut at the chunk boundary, as a stored hit would be.
    assert await store.lookup(spec, [*tokens[:20], 999]) == 16

    backend.gate.set()
    result = await handle
    assert (result.num_tokens, result.chunks_written) == (40, 3)
    await store.close()
    fresh_hit = await _load_fresh(tmp_path, spec, tokens)
    assert fresh_hit.num_tokens == 40
    assert_kv_equal(fresh_hit.kv, expected)


async def test_layer_streams_and_prefetches_read_a_background_save(
    tmp_path: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    spec, tokens, expected, store, backend, handle = await _saving_in_background(tmp_path, make_spec, make_kv)
    for query in (tokens, [*tokens, 7]):  # all the tokens (no request), and more (the store has nothing longer)
        async with store.load_prefix_layers(spec, query) as layers:
            got = [(k, v) async for _, k, v in layers]
        assert layers.num_tokens == 40
        assert_kv_equal(got, expected)
        got[0][0].zero_()  # the caller's tensors are its own: the pending upload keeps its copy
        prefetched = await store.prefetch(spec, [*query, 8])
        assert prefetched.num_tokens == 40
        assert_kv_equal(prefetched.kv, expected)
    assert not handle.done()
    backend.gate.set()
    await store.flush()
    await store.close()
    fresh_hit = await _load_fresh(tmp_path, spec, tokens)
    assert_kv_equal(fresh_hit.kv, expected)


async def _load_fresh(tmp_path: Any, spec: Any, tokens: list[int]) -> Any:
    async with kvstore.open(str(tmp_path / "kv")) as fresh:
        return await fresh.load_prefix(spec, tokens)


async def test_a_full_queue_makes_the_next_save_wait(
    tmp_path: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    spec = make_spec()
    budget = spec.bytes_per_token * 40  # room for one 40-token save
    store, backend = await _gated(tmp_path, writeback_budget=budget)
    await store.save_prefix(spec, list(range(40)), make_kv(spec, 40), wait=False)
    second = asyncio.create_task(store.save_prefix(spec, list(range(100, 140)), make_kv(spec, 40), wait=False))
    await asyncio.sleep(0.2)
    assert not second.done()  # backpressure, not memory growth
    assert store._writeback.used <= budget
    backend.gate.set()
    await asyncio.wait_for(second, 10)
    await store.flush()
    assert store._writeback.used == 0
    await store.close()


async def test_upload_errors_are_raised_by_flush_and_close(
    tmp_path: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    spec = make_spec()
    store, backend = await _gated(tmp_path)
    backend.fail = True
    backend.gate.set()
    await store.save_prefix(spec, list(range(40)), make_kv(spec, 40), wait=False)
    with pytest.raises(WriteBackError) as caught:
        await store.flush()
    assert isinstance(caught.value.errors[0], StoreUnavailableError)
    await store.flush()  # reported once

    await store.save_prefix(spec, list(range(50, 90)), make_kv(spec, 40), wait=False)
    with pytest.raises(WriteBackError):
        await store.close()


async def test_an_awaited_handle_takes_its_error(
    tmp_path: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    spec = make_spec()
    store, backend = await _gated(tmp_path)
    backend.fail = True
    backend.gate.set()
    handle = await store.save_prefix(spec, list(range(40)), make_kv(spec, 40), wait=False)
    with pytest.raises(StoreUnavailableError):
        await handle
    await store.flush()  # already delivered to the awaiting caller
    await store.close()


def test_sync_facade_saves_in_the_background(
    tmp_path: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    spec = make_spec()
    kv = make_kv(spec, 40)
    with kvstore.sync.open(str(tmp_path / "kv"), chunk_tokens=CHUNK) as store:
        store.save_prefix_background(spec, list(range(40)), kv)
        store.flush()
        assert store.stats().chunks_written == 3
        assert_kv_equal(store.load_prefix(spec, list(range(40))).kv, kv)
