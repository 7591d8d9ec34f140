"""Concurrent use of one store, and of one location by several stores; the per-store request limit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import kvstore
from kvstore.formats.keys import chunk_keys, normalize_tokens
from kvstore.formats.layout import parse_chunk_object
from kvstore.storage import LocalObjectStore, open_object_store

CT = 16
Spec = kvstore.ModelSpec
KV = list[tuple[torch.Tensor, torch.Tensor]]

# Prefix lengths of one 100-token prompt: repeats, chunk boundaries and tails of several lengths.
PREFIXES = [100, 100, 100, 96, 80, 64, 50, 50, 33, 20, 16, 7]


def _open(store_url: tuple[str, Any], **kwargs: Any) -> Any:
    url, options = store_url
    return kvstore.open(url, storage_options=options, chunk_tokens=CT, **kwargs)


def _workload(spec: Spec, make_kv: Callable[..., KV]) -> list[tuple[list[int], KV]]:
    """Prompts that share prefixes, with consistent KV: equal tokens at equal positions get equal KV."""
    base = list(range(7000, 7100))
    base_kv = make_kv(spec, len(base), seed=1)
    prompts = [(base[:n], [(k[:n], v[:n]) for k, v in base_kv]) for n in PREFIXES]
    # A branch that shares the first two chunks (and 8 tokens more) with the base prompt.
    branch = [*base[:40], *range(90_000, 90_030)]
    own = make_kv(spec, 30, seed=2)
    branch_kv = [
        (torch.cat([bk[:40], ok]), torch.cat([bv[:40], ov])) for (bk, bv), (ok, ov) in zip(base_kv, own, strict=True)
    ]
    prompts += [(branch, branch_kv), (branch[:52], [(k[:52], v[:52]) for k, v in branch_kv])]
    return prompts


def _distinct_chunks(spec: Spec, prompts: list[tuple[list[int], KV]]) -> set[bytes]:
    return {key.digest for tokens, _ in prompts for key in chunk_keys(spec, normalize_tokens(tokens), CT)}


async def _committed_chunks(store_url: tuple[str, Any]) -> int:
    backend = await open_object_store(*store_url)
    try:
        return len([m async for m in backend.list("chunks/") if (o := parse_chunk_object(m.key)) and o.kind == "data"])
    finally:
        await backend.close()


async def _check_every_prompt_loads(
    store: kvstore.KVStore, spec: Spec, prompts: list[tuple[list[int], KV]], assert_kv_equal: Callable[..., None]
) -> None:
    hits = await asyncio.gather(*(store.load_prefix(spec, tokens) for tokens, _ in prompts))
    lookups = await asyncio.gather(*(store.lookup(spec, tokens) for tokens, _ in prompts))
    for (tokens, kv), hit, found in zip(prompts, hits, lookups, strict=True):
        assert hit.num_tokens == len(tokens) == found
        assert hit.chunks_damaged == 0
        assert_kv_equal(hit.kv, kv)


async def test_concurrent_saves_of_overlapping_prefixes(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec(torch.bfloat16, num_layers=3)
    prompts = _workload(spec, make_kv)
    distinct = _distinct_chunks(spec, prompts)
    async with _open(store_url) as store:
        results = await asyncio.gather(*(store.save_prefix(spec, tokens, kv) for tokens, kv in prompts))
        for (tokens, _), result in zip(prompts, results, strict=True):
            assert result.num_tokens == len(tokens)
            assert result.chunks_written + result.chunks_skipped == len(chunk_keys(spec, normalize_tokens(tokens), CT))
        # Racing saves may both write a chunk, but every chunk is written at least once.
        assert store.stats().chunks_written >= len(distinct)
        await _check_every_prompt_loads(store, spec, prompts, assert_kv_equal)
        again = await asyncio.gather(*(store.save_prefix(spec, tokens, kv) for tokens, kv in prompts))
        assert sum(r.chunks_written for r in again) == 0
    assert await _committed_chunks(store_url) == len(distinct)


async def test_two_stores_share_one_location(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec(torch.float16)
    prompts = _workload(spec, make_kv)
    # Both create the (new) store at once; they must agree on it.
    first, second = await asyncio.gather(_open(store_url), _open(store_url))
    try:
        # Each prompt goes to one of the two; the repeated prompts of PREFIXES land on both.
        saves = [(first if i % 2 else second).save_prefix(spec, tokens, kv) for i, (tokens, kv) in enumerate(prompts)]
        await asyncio.gather(*saves)
        await _check_every_prompt_loads(first, spec, prompts, assert_kv_equal)  # half of them saved by `second`
    finally:
        await asyncio.gather(first.close(), second.close())
    async with _open(store_url) as third:
        await _check_every_prompt_loads(third, spec, prompts, assert_kv_equal)
    assert await _committed_chunks(store_url) == len(_distinct_chunks(spec, prompts))


async def test_loads_during_saves_see_whole_chunks_only(
    tmp_path: Path,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    slice_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    counting_store: Callable[..., Any],
) -> None:
    """A chunk becomes visible with its data object, written whole: never half-written."""
    spec = make_spec(num_layers=4)
    prompt = list(range(8 * CT))
    kv = make_kv(spec, len(prompt))
    slow = counting_store(LocalObjectStore(tmp_path / "kv"), delay=0.002)
    writer = kvstore.KVStore(slow, kvstore.StoreOptions(chunk_tokens=CT, max_concurrency=4))
    reader = kvstore.KVStore(LocalObjectStore(tmp_path / "kv"), kvstore.StoreOptions(chunk_tokens=CT))
    seen: list[int] = []

    async def poll() -> None:
        while not saving.done():
            hit = await reader.load_prefix(spec, prompt)
            assert hit.chunks_damaged == 0
            assert hit.num_tokens % CT == 0
            assert_kv_equal(hit.kv, slice_kv(kv, hit.num_tokens))
            seen.append(hit.num_tokens)
            await asyncio.sleep(0)

    try:
        saving = asyncio.ensure_future(writer.save_prefix(spec, prompt, kv))
        await asyncio.gather(saving, poll())
        final = await reader.load_prefix(spec, prompt)
    finally:
        await writer.close()
        await reader.close()
    assert final.num_tokens == len(prompt)
    assert len(seen) > 1
    assert reader.stats().chunks_damaged == 0


# ---------------------------------------------------------------------- the request limit


@pytest.mark.parametrize("limit", [1, 3, 8])
async def test_max_concurrency_bounds_requests_in_flight(
    tmp_path: Path,
    limit: int,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: Callable[..., Any],
) -> None:
    spec = make_spec(num_layers=2)
    prompt = list(range(8 * CT + 5))
    kv = make_kv(spec, len(prompt))
    backend = counting_store(LocalObjectStore(tmp_path / "kv"), delay=0.002)
    store = kvstore.KVStore(backend, kvstore.StoreOptions(chunk_tokens=CT, max_concurrency=limit))
    try:
        await asyncio.gather(
            store.save_prefix(spec, prompt, kv),
            store.save_prefix(spec, prompt[:70], [(k[:70], v[:70]) for k, v in kv]),
        )
        await asyncio.gather(
            store.load_prefix(spec, prompt),
            store.load_prefix(spec, [*prompt, 1, 2, 3]),  # extends the saved tail: needs a listing
            store.lookup(spec, prompt[:50]),
            store.lookup(spec, [*prompt[:40], 5, 5, 5]),
        )
    finally:
        await store.close()
    assert {"put", "head", "list"} <= set(backend.calls)
    assert backend.calls["get"] + backend.calls["get_into"] > 0
    assert backend.peak <= limit, dict(backend.peak_by_op)
    assert backend.peak == limit  # the limit is reached, so the work really runs concurrently


async def test_listing_models_respects_max_concurrency(
    tmp_path: Path,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: Callable[..., Any],
) -> None:
    specs = [make_spec(version=f"v{i}") for i in range(3)]
    prompt = list(range(4 * CT))
    backend = counting_store(LocalObjectStore(tmp_path / "kv"), delay=0.002)
    store = kvstore.KVStore(backend, kvstore.StoreOptions(chunk_tokens=CT, max_concurrency=1))
    try:
        for spec in specs:
            await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))
        backend.reset()
        before = store.stats()
        models, *_ = await asyncio.gather(store.models(), *(store.lookup(spec, prompt) for spec in specs))
        after = store.stats()
    finally:
        await store.close()
    assert sorted(m.spec.version for m in models) == ["v0", "v1", "v2"]
    assert backend.peak <= 1, dict(backend.peak_by_op)
    assert after.requests_list - before.requests_list == backend.calls["list"]


async def test_the_store_codec_is_fixed_at_creation(
    tmp_path: Path, make_spec: Callable[..., kvstore.ModelSpec], make_kv: Callable[..., KV]
) -> None:
    """Every chunk of a store has the store's codec: the one its arrays' shared zarr.json names."""
    url = str(tmp_path / "kv")
    spec = make_spec(num_layers=2)
    async with kvstore.open(url, codec="lz4", chunk_tokens=CT) as store:
        await store.save_prefix(spec, list(range(CT)), make_kv(spec, CT))
    async with kvstore.open(url) as store:  # None: the store's
        assert store.options.codec == "lz4"
        assert (await store.load_prefix(spec, list(range(CT)))).num_tokens == CT
    with pytest.raises(kvstore.StoreConfigError, match="codec='lz4'"):
        async with kvstore.open(url, codec="none"):
            pass
