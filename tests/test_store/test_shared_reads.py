"""Concurrent loads of overlapping prefixes read each stored object once (kvstore/fetching.py).

Overlap is made certain with gates (every chunk's first read held until the test
opens them); the request counts come from the conftest counting store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _gates import make_gated, wait_held

import kvstore
from kvstore.fetching import SharedReads
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.formats.shard import parse_head
from kvstore.storage import open_object_store

CT = 16
Spec = kvstore.ModelSpec
KV = list[tuple[torch.Tensor, torch.Tensor]]
SHARED = 3 * CT  # the common prefix: three chunks
LAYERS = 2


def _prompts() -> tuple[list[int], list[int]]:
    common = list(range(100, 100 + SHARED))
    return common + list(range(5000, 5000 + 2 * CT)), common + list(range(9000, 9000 + CT))


async def _setup(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: type,
    *,
    repair: bool = True,
) -> tuple[Spec, Any, kvstore.KVStore, list[tuple[list[int], KV]]]:
    """Both prompts saved (their common prefix once), then a store whose first read of every chunk waits at a gate."""
    spec = make_spec(torch.bfloat16, name="shared", num_layers=LAYERS)
    a, b = _prompts()
    kv_a = make_kv(spec, len(a), seed=1)
    kv_b = [(torch.cat([k[:SHARED], k2[SHARED:]]), torch.cat([v[:SHARED], v2[SHARED:]])) for (k, v), (k2, v2) in
            zip(kv_a, make_kv(spec, len(b), seed=2), strict=True)]  # fmt: skip
    url, options = store_url
    async with kvstore.open(url, storage_options=options, chunk_tokens=CT) as store:
        await store.save_prefix(spec, a, kv_a)
        await store.save_prefix(spec, b, kv_b)
    backend = make_gated(counting_store)(await open_object_store(url, options), gated=[0])
    store = kvstore.KVStore(backend, kvstore.StoreOptions(chunk_tokens=CT, repair=repair))
    return spec, backend, store, [(a, kv_a), (b, kv_b)]


async def _overlap(
    store: kvstore.KVStore, backend: Any, spec: Spec, a: list[int], b: list[int]
) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """Load ``a`` then ``b`` so that b's requests arrive while every one of a's reads is held at a gate."""
    load_a = asyncio.create_task(store.load_prefix(spec, a))
    await wait_held(backend, 5)  # every chunk of a is being read
    load_b = asyncio.create_task(store.load_prefix(spec, b))
    await wait_held(backend, 6)  # b reads only its own last chunk; it waits on a's reads for the rest
    return load_a, load_b


def _chunk_reads(backend: Any) -> int:
    """Chunks read: one request each."""
    return len(backend.order)


async def test_overlapping_loads_read_each_object_once(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: type,
    assert_kv_equal: Callable[..., None],
) -> None:
    spec, backend, store, [(a, kv_a), (b, kv_b)] = await _setup(store_url, make_spec, make_kv, counting_store)
    async with store:
        load_a, load_b = await _overlap(store, backend, spec, a, b)
        backend.open_all()
        hit_a, hit_b = await asyncio.gather(load_a, load_b)
        assert (hit_a.num_tokens, hit_b.num_tokens) == (len(a), len(b))
        assert_kv_equal(hit_a.kv, kv_a)
        assert_kv_equal(hit_b.kv, kv_b)
        assert _chunk_reads(backend) == 6  # without sharing: 5 + 4 chunks
        assert store.stats().reads_shared == 3
        assert len(store._loads.shared) == 0


async def test_cancelled_owner_leaves_followers_to_read_themselves(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: type,
    assert_kv_equal: Callable[..., None],
) -> None:
    spec, backend, store, [(a, _), (b, kv_b)] = await _setup(store_url, make_spec, make_kv, counting_store)
    async with store:
        load_a, load_b = await _overlap(store, backend, spec, a, b)
        load_a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load_a
        await wait_held(backend, 4)  # b now reads the common chunks itself
        backend.open_all()
        hit_b = await load_b
        assert hit_b.num_tokens == len(b)
        assert_kv_equal(hit_b.kv, kv_b)
        assert store.stats().reads_shared == 0
        assert len(store._loads.shared) == 0


async def test_damage_seen_by_the_owner_is_seen_by_followers(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: type,
    assert_kv_equal: Callable[..., None],
    slice_kv: Callable[..., KV],
) -> None:
    """A follower never takes bytes its owner rejected: it reads (and rejects) them itself.

    Without repair, so that the owner's load does not delete the object before the follower reads it.
    """
    spec, backend, store, [(a, kv_a), (b, _)] = await _setup(
        store_url, make_spec, make_kv, counting_store, repair=False
    )
    key = chunk_keys(spec, normalize_tokens(a), CT)[1]
    damaged = data_path(model_id(spec), key.digest, key.num_tokens)
    data = await backend.inner.get(damaged)
    span = parse_head(data, LAYERS, len(data)).spans[1]
    await backend.inner.put(damaged, data[: span.offset] + b"\0" * span.nbytes + data[span.end :])
    async with store:
        load_a, load_b = await _overlap(store, backend, spec, a, b)
        backend.open_all()
        hit_a, hit_b = await asyncio.gather(load_a, load_b)
        assert hit_a.num_tokens == hit_b.num_tokens == CT  # both end before the damaged chunk 1
        assert_kv_equal(hit_a.kv, slice_kv(kv_a, CT))
        assert_kv_equal(hit_b.kv, slice_kv(kv_a, CT))
        assert hit_a.chunks_damaged == hit_b.chunks_damaged == 1


def test_shared_reads_bookkeeping() -> None:
    async def run() -> None:
        reads = SharedReads()
        assert reads.follow("x", ()) is None  # the owner
        dest = [np.zeros(4, np.uint8), np.zeros(2, np.uint8)]
        waiter = reads.follow("x", dest)
        gone = reads.follow("x", [np.zeros(4, np.uint8), np.zeros(2, np.uint8)])
        assert waiter is not None
        assert gone is not None
        gone.cancel()  # a follower that left is skipped
        assert reads.deliver("x", [np.arange(4, dtype=np.uint8), np.ones(2, np.uint8)]) == 1
        assert await waiter
        assert dest[0].tolist() == [0, 1, 2, 3]
        assert dest[1].tolist() == [1, 1]
        assert len(reads) == 0
        assert reads.follow("y", ()) is None
        late = reads.follow("y", dest)
        assert late is not None
        reads.abandon("y")
        assert await late is False
        assert reads.deliver("y", []) == 0  # already gone: nothing to do
        reads.abandon("y")

    asyncio.run(run())


async def test_overlapping_layer_streams_share_reads_without_waiting_on_each_other(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: type,
    assert_kv_equal: Callable[..., None],
) -> None:
    """Layer-pipelined loads hold their later layers until layer 0 is complete; a chunk that follows another
    load's read must not count against that barrier, or two loads sharing chunks could wait on each other."""
    spec, backend, store, [(a, kv_a), (b, kv_b)] = await _setup(store_url, make_spec, make_kv, counting_store)
    backend.open_all()

    async def stream(tokens: list[int]) -> KV:
        async with store.load_prefix_layers(spec, tokens) as layers:
            return [(k, v) async for _, k, v in layers]

    async with store:
        for _ in range(5):
            async with asyncio.timeout(30):
                got_a, got_b, got_a2 = await asyncio.gather(stream(a), stream(b), stream(a))
            assert_kv_equal(got_a, kv_a)
            assert_kv_equal(got_a2, kv_a)
            assert_kv_equal(got_b, kv_b)
        assert len(store._loads.shared) == 0
