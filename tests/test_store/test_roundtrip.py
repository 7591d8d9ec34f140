"""Save, look up and load through the public API, on every backend: bits, hits, dedup and request counts."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import kvstore
from kvstore.formats.keys import chunk_keys, normalize_tokens
from kvstore.formats.layout import parse_chunk_object
from kvstore.storage import open_object_store

CT = 16  # chunk_tokens of every store in this module
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
CODECS = ["none", "lz4", "blosc-lz4"]

Spec = kvstore.ModelSpec
KV = list[tuple[torch.Tensor, torch.Tensor]]


def _open(store_url: tuple[str, Any], **kwargs: Any) -> Any:
    url, options = store_url
    kwargs.setdefault("chunk_tokens", CT)
    return kvstore.open(url, storage_options=options, **kwargs)


def _is_data(key: str) -> bool:
    parsed = parse_chunk_object(key)
    return parsed is not None and parsed.kind == "data"


async def _objects(store_url: tuple[str, Any], prefix: str = "") -> dict[str, int]:
    """Every object under ``prefix`` of the store, read with a separate backend."""
    backend = await open_object_store(*store_url)
    try:
        return {m.key: m.size async for m in backend.list(prefix)}
    finally:
        await backend.close()


def _stats_delta(before: kvstore.StoreStats, after: kvstore.StoreStats) -> dict[str, int]:
    """The counters that changed between two snapshots."""
    delta = {f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}
    return {name: d for name, d in delta.items() if d}


def _assert_miss(result: kvstore.LoadResult, spec: Spec) -> None:
    assert result.num_tokens == 0
    assert not result.hit
    assert result.chunks_loaded == 0
    assert result.bytes_read == 0
    assert len(result.kv) == spec.num_layers
    for k, v in result.kv:
        for t in (k, v):
            assert t.shape == (0, spec.num_kv_heads, spec.head_dim)
            assert t.dtype == spec.dtype
            assert t.device.type == "cpu"


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
async def test_roundtrip_is_bit_exact(
    store_url: tuple[str, Any],
    dtype: torch.dtype,
    codec: str,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec(dtype)
    tokens = list(range(1000, 1040))  # two full chunks and an 8-token tail
    kv = make_kv(spec, len(tokens))
    async with _open(store_url, codec=codec) as store:
        saved = await store.save_prefix(spec, tokens, kv)
        assert (saved.num_tokens, saved.chunks_written, saved.chunks_skipped) == (40, 3, 0)
        assert await store.lookup(spec, tokens) == 40
        hit = await store.load_prefix(spec, tokens)
    assert (hit.num_tokens, hit.chunks_loaded, hit.chunks_damaged) == (40, 3, 0)
    assert hit.hit
    assert_kv_equal(hit.kv, kv)
    data_objects = {k: n for k, n in (await _objects(store_url, "chunks/")).items() if _is_data(k)}
    assert len(data_objects) == 3  # one per chunk
    assert hit.bytes_read == sum(data_objects.values())
    if codec == "none":  # the KV bytes, plus per chunk an index, a header and a crc32c per layer
        assert 0 < hit.bytes_read - 40 * spec.bytes_per_token < 3 * 2048

    # The codec is the store's: opening adopts it, asking for another is refused.
    other = CODECS[(CODECS.index(codec) + 1) % len(CODECS)]
    with pytest.raises(kvstore.StoreConfigError, match="codec"):
        async with _open(store_url, codec=other):
            pass
    async with _open(store_url, codec=None) as store:
        again = await store.load_prefix(spec, tokens)
        assert (await store.save_prefix(spec, tokens, kv)).chunks_written == 0
    assert again.num_tokens == 40
    assert_kv_equal(again.kv, kv)


async def test_partial_hits_count_whole_shared_chunks(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    slice_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec(torch.float16)
    saved = list(range(5 * CT))
    kv = make_kv(spec, len(saved))
    async with _open(store_url) as store:
        await store.save_prefix(spec, saved, kv)
        for shared_chunks in range(6):
            for extra in (0, 5):  # diverge at a chunk boundary, or 5 tokens into the next chunk
                shared = min(shared_chunks * CT + extra, len(saved))
                query = saved[:shared] + [50_000 + i for i in range(len(saved) - shared + 7)]
                expected = shared_chunks * CT
                assert await store.lookup(spec, query) == expected, (shared_chunks, extra)
                hit = await store.load_prefix(spec, query)
                assert (hit.num_tokens, hit.chunks_loaded) == (expected, shared_chunks)
                assert_kv_equal(hit.kv, slice_kv(kv, expected))


async def test_tail_chunk_is_saved_and_hit_in_full(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    slice_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec()
    prompt = list(range(3 * CT + 2))  # a 2-token tail
    kv = make_kv(spec, len(prompt))
    async with _open(store_url) as store:
        result = await store.save_prefix(spec, prompt, kv)
        assert (result.num_tokens, result.chunks_written) == (50, 4)
        assert await store.lookup(spec, prompt) == 50
        hit = await store.load_prefix(spec, prompt)
        assert (hit.num_tokens, hit.chunks_loaded) == (50, 4)
        assert_kv_equal(hit.kv, kv)

        # A longer prompt that continues the saved one also gets the saved tail.
        longer = [*prompt, *range(9000, 9030)]
        assert await store.lookup(spec, longer) == 50
        hit = await store.load_prefix(spec, longer)
        assert hit.num_tokens == 50
        assert_kv_equal(hit.kv, kv)

        # Shorter than the tail, or a different tail: only the full chunks match.
        assert await store.lookup(spec, prompt[:49]) == 48
        assert await store.lookup(spec, [*prompt[:48], 7777, 7778]) == 48
        hit = await store.load_prefix(spec, [*prompt[:48], 7777, 7778, 7779])
        assert hit.num_tokens == 48
        assert_kv_equal(hit.kv, slice_kv(kv, 48))


async def test_save_tail_false_leaves_the_tail_unsaved(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    slice_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec()
    prompt = list(range(3 * CT + 5))
    kv = make_kv(spec, len(prompt))
    async with _open(store_url, save_tail=False) as store:
        result = await store.save_prefix(spec, prompt, kv)
        assert (result.num_tokens, result.chunks_written, result.chunks_skipped) == (48, 3, 0)
        assert await store.lookup(spec, prompt) == 48
        hit = await store.load_prefix(spec, prompt)
        assert hit.num_tokens == 48
        assert_kv_equal(hit.kv, slice_kv(kv, 48))
        short = await store.save_prefix(spec, prompt[:5], slice_kv(kv, 5))
        assert short == kvstore.SaveResult(0, 0, 0, 0, 0)
        assert await store.lookup(spec, prompt[:5]) == 0
    assert not [k for k in await _objects(store_url) if "/tails/" in k]

    async with _open(store_url) as store:  # save_tail=True: only the tail is new
        result = await store.save_prefix(spec, prompt, kv)
        assert (result.num_tokens, result.chunks_written, result.chunks_skipped) == (53, 1, 3)
        assert await store.lookup(spec, prompt) == 53


# ---------------------------------------------------------------------- dedup and request counts


async def test_dedup_counts(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
) -> None:
    spec = make_spec(num_layers=3)
    per_chunk = 1  # the data object; the array's zarr.json once per open store
    prompt = list(range(3 * CT))
    longer = [*prompt, *range(500, 500 + 2 * CT)]
    kv = make_kv(spec, len(longer))
    async with _open(store_url) as store:
        first = await store.save_prefix(spec, prompt, [(k[:48], v[:48]) for k, v in kv])
        assert (first.num_tokens, first.chunks_written, first.chunks_skipped) == (48, 3, 0)
        assert first.objects_written == 3 * per_chunk + 1
        stored = await _objects(store_url, "chunks/")
        assert len(stored) == first.objects_written
        assert first.bytes_written == sum(stored.values())

        puts = store.stats().requests_put
        second = await store.save_prefix(spec, prompt, [(k[:48], v[:48]) for k, v in kv])
        assert second == kvstore.SaveResult(48, 0, 3, 0, 0)
        assert store.stats().requests_put == puts  # a repeated save writes nothing

        third = await store.save_prefix(spec, longer, kv)
        assert (third.num_tokens, third.chunks_written, third.chunks_skipped) == (80, 2, 3)
        assert third.objects_written == 2 * per_chunk
        stored_now = await _objects(store_url, "chunks/")
        assert len(stored_now) == first.objects_written + third.objects_written
        assert third.bytes_written == sum(stored_now.values()) - sum(stored.values())

        stats = store.stats()
    assert stats.saves == 3
    assert stats.chunks_written == 5
    assert stats.chunks_skipped == 6
    assert stats.bytes_written == first.bytes_written + third.bytes_written


async def test_objects_per_chunk_and_reads_per_chunk(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
) -> None:
    spec = make_spec(num_layers=3)
    chunks = 4
    prompt = list(range(chunks * CT))
    kv = make_kv(spec, len(prompt))
    async with _open(store_url) as store:
        # A first save under the model does one-off work (its model record); keep it out of the count.
        warm_up = [1, *prompt[1:CT]]
        await store.save_prefix(spec, warm_up, [(k[:CT], v[:CT]) for k, v in kv])
        before = store.stats()
        await store.save_prefix(spec, prompt, kv)
        saved = store.stats()
        # one HEAD per chunk, then 1 object per chunk: the data object (the array's zarr.json came with the warm-up)
        assert _stats_delta(before, saved) == {
            "saves": 1,
            "chunks_written": chunks,
            "bytes_written": saved.bytes_written - before.bytes_written,
            "requests_head": chunks,
            "requests_put": chunks,
        }
        hit = await store.load_prefix(spec, prompt)
        loaded = store.stats()
        assert hit.num_tokens == chunks * CT
        # one round of HEADs, then one GET per chunk (a local file: a pread of its head and one preadv); no listing
        gets = 1
        assert _stats_delta(saved, loaded) == {
            "loads": 1,
            "chunks_loaded": chunks,
            "bytes_read": hit.bytes_read,
            "requests_head": chunks,
            "requests_get": chunks * gets,
            "load_tokens": len(prompt),
            "load_tokens_hit": len(prompt),
            "load_chunks": chunks,
            "load_chunks_hit": chunks,
        }

    kinds = Counter(o.kind for key in await _objects(store_url, "chunks/") if (o := parse_chunk_object(key)))
    assert kinds == {"data": chunks + 1, "metadata": 1}  # with the warm-up chunk; one array: one zarr.json


@pytest.mark.parametrize(
    ("backend", "num_chunks"),
    [
        ("memory", 512),
        ("local", 512),
        ("moto", 64),
        ("rgw", 64),
        pytest.param("moto", 512, marks=pytest.mark.slow),  # ~15 s on moto
        pytest.param("rgw", 512, marks=pytest.mark.slow),
    ],
)
async def test_lookup_is_one_concurrent_round(
    store_url: tuple[str, Any],
    num_chunks: int,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    counting_store: Callable[..., Any],
) -> None:
    chunk_tokens = 2
    spec = make_spec(torch.float8_e4m3fn, num_layers=1, num_kv_heads=1, head_dim=2)
    prompt = list(range(num_chunks * chunk_tokens))
    async with _open(store_url, chunk_tokens=chunk_tokens, max_concurrency=64) as store:
        assert (await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))).chunks_written == num_chunks

    counted = counting_store(await open_object_store(*store_url), delay=0.01)
    store = kvstore.KVStore(counted, kvstore.StoreOptions(chunk_tokens=chunk_tokens, max_concurrency=4 * num_chunks))
    try:
        before = store.stats()
        assert await store.lookup(spec, prompt) == len(prompt)
        after = store.stats()
        calls = dict(counted.calls)  # before close(), which writes the lookup's access record
    finally:
        await store.close()
    assert _stats_delta(before, after) == {"lookups": 1, "requests_head": num_chunks}
    assert calls == {"head": num_chunks}
    assert counted.peak == num_chunks  # every HEAD in flight at once: one round, not a chain of them


# ---------------------------------------------------------------------- misses


@pytest.mark.parametrize(
    "change",
    [
        {"version": "v2"},
        {"name": "other-model"},
        {"num_layers": 3},
        {"num_kv_heads": 4},
        {"head_dim": 16},
        {"dtype": torch.float16},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_other_model_identity_misses(
    store_url: tuple[str, Any],
    change: dict[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
) -> None:
    spec = make_spec(torch.bfloat16)
    other = dataclasses.replace(spec, **change)
    prompt = list(range(2 * CT + 3))
    async with _open(store_url) as store:
        await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))
        assert await store.lookup(spec, prompt) == len(prompt)  # the data is there ...
        assert await store.lookup(other, prompt) == 0  # ... but not for another model
        _assert_miss(await store.load_prefix(other, prompt), other)


async def test_other_chunk_size_misses(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
) -> None:
    spec = make_spec()
    prompt = list(range(8))  # a lone tail chunk: same tokens, same length under any chunk size
    async with _open(store_url) as store:
        await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))
        assert await store.lookup(spec, prompt) == 8
    # Bypass the root record's check to read the same objects with another chunk size.
    for chunk_tokens in (8, 32):
        store = kvstore.KVStore(await open_object_store(*store_url), kvstore.StoreOptions(chunk_tokens=chunk_tokens))
        try:
            assert await store.lookup(spec, prompt) == 0, chunk_tokens
            _assert_miss(await store.load_prefix(spec, prompt), spec)
        finally:
            await store.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e5m2], ids=str)
async def test_miss_returns_empty_tensors_of_the_spec_dtype(
    store_url: tuple[str, Any], dtype: torch.dtype, make_spec: Callable[..., Spec]
) -> None:
    spec = make_spec(dtype, num_layers=3, num_kv_heads=2, head_dim=16)
    async with _open(store_url) as store:
        assert await store.lookup(spec, list(range(40))) == 0
        _assert_miss(await store.load_prefix(spec, list(range(40))), spec)
        _assert_miss(await store.load_prefix(spec, []), spec)
        assert await store.lookup(spec, []) == 0


async def test_invalid_kv_is_rejected_before_anything_is_written(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV]
) -> None:
    spec = make_spec()
    prompt = list(range(40))
    good = make_kv(spec, 40)
    bad_inputs = [
        good[:1],  # too few layers
        [*good[:-1], (good[-1][0].float(), good[-1][1].float())],  # wrong dtype in the last layer
        make_kv(spec, 39),  # one token short
    ]
    async with _open(store_url) as store:
        for kv in bad_inputs:
            with pytest.raises(kvstore.InvalidInputError):
                await store.save_prefix(spec, prompt, kv)
        with pytest.raises(kvstore.InvalidInputError):
            await store.save_prefix(spec, [], make_kv(spec, 0))
        assert store.stats().requests_put == 0
    assert await _objects(store_url, "chunks/") == {}
    assert await _objects(store_url, "models/") == {}


# ---------------------------------------------------------------------- opening


async def test_reopening_with_another_chunk_size_raises(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV]
) -> None:
    spec = make_spec()
    prompt = list(range(2 * CT))
    async with _open(store_url) as store:
        await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))
    with pytest.raises(kvstore.StoreConfigError, match="chunk_tokens"):
        await _open(store_url, chunk_tokens=2 * CT)
    with pytest.raises(kvstore.StoreConfigError):
        async with _open(store_url, chunk_tokens=CT // 2):
            pytest.fail("opened a store with another chunk size")
    async with _open(store_url, chunk_tokens=None) as store:  # None adopts the store's setting
        assert store.chunk_tokens == CT
        assert await store.lookup(spec, prompt) == 2 * CT


async def test_open_without_create_needs_an_existing_store(store_url: tuple[str, Any]) -> None:
    with pytest.raises(kvstore.StoreConfigError):
        await _open(store_url, create=False)
    assert await _objects(store_url) == {}
    async with _open(store_url):
        pass
    store = await _open(store_url, create=False, chunk_tokens=None)
    assert store.chunk_tokens == CT
    await store.close()


@pytest.mark.parametrize("chunk_tokens", [0, -1, 2**24 + 1])
async def test_open_rejects_invalid_chunk_tokens_without_writing(store_url: tuple[str, Any], chunk_tokens: int) -> None:
    with pytest.raises(kvstore.InvalidInputError):
        await _open(store_url, chunk_tokens=chunk_tokens)
    assert await _objects(store_url) == {}


async def test_open_as_context_manager_and_as_awaitable(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV]
) -> None:
    spec = make_spec()
    prompt = list(range(CT))
    kv = make_kv(spec, CT)
    async with _open(store_url) as store:
        assert isinstance(store, kvstore.KVStore)
        assert (await store.save_prefix(spec, prompt, kv)).chunks_written == 1
    with pytest.raises(kvstore.StoreUnavailableError):  # closed on exit
        await store.lookup(spec, prompt)

    store = await _open(store_url)
    assert isinstance(store, kvstore.KVStore)
    assert store.chunk_tokens == CT
    assert await store.lookup(spec, prompt) == CT
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(kvstore.StoreUnavailableError):
        await store.load_prefix(spec, prompt)
    with pytest.raises(kvstore.StoreUnavailableError):
        await store.save_prefix(spec, prompt, kv)


# ---------------------------------------------------------------------- sync facade, inputs, devices


def test_sync_facade_roundtrip(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    url, options = store_url
    spec = make_spec(torch.float8_e4m3fn)
    prompt = list(range(2 * CT + 4))
    kv = make_kv(spec, len(prompt))
    with kvstore.sync.open(url, storage_options=options, chunk_tokens=CT) as store:
        assert isinstance(store, kvstore.SyncStore)
        assert store.chunk_tokens == CT
        assert store.save_prefix(spec, prompt, kv).chunks_written == 3
        assert store.lookup(spec, prompt) == len(prompt)
        hit = store.load_prefix(spec, prompt)
        assert store.stats().loads == 1
        assert [m.spec for m in store.models()] == [spec]
    assert hit.num_tokens == len(prompt)
    assert_kv_equal(hit.kv, kv)

    store = kvstore.sync.open(url, storage_options=options)
    try:
        assert store.chunk_tokens == CT
        assert store.save_prefix(spec, prompt, kv).chunks_skipped == 3
        assert_kv_equal(store.load_prefix(spec, prompt).kv, kv)
    finally:
        store.close()
    with pytest.raises(kvstore.StoreConfigError):
        kvstore.sync.open(url, storage_options=options, chunk_tokens=2 * CT)


def test_token_inputs_give_the_same_keys(make_spec: Callable[..., Spec]) -> None:
    spec = make_spec()
    ids = [0, 1, 7, 151_000, 2**31 - 1, 5, *range(100, 140)]
    forms = [
        ids,
        tuple(ids),
        np.array(ids, dtype=np.int64),
        np.array(ids, dtype=np.int32),
        np.array(ids, dtype=np.uint32),
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(ids, dtype=torch.int32),
    ]
    expected = chunk_keys(spec, normalize_tokens(ids), CT)
    assert len(expected) == 3
    for form in forms:
        assert chunk_keys(spec, normalize_tokens(form), CT) == expected, type(form)
    shifted = chunk_keys(spec, normalize_tokens([*ids[:-1], ids[-1] + 1]), CT)
    assert shifted[:2] == expected[:2]
    assert shifted[2] != expected[2]


async def test_token_input_types_hit_the_same_chunks(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec()
    ids = list(range(60_000, 60_000 + 2 * CT + 3))
    kv = make_kv(spec, len(ids))
    forms = [np.array(ids, dtype=np.int32), np.array(ids, dtype=np.uint32), torch.tensor(ids), ids]
    async with _open(store_url) as store:
        assert (await store.save_prefix(spec, ids, kv)).chunks_written == 3
        for form in forms:
            assert await store.lookup(spec, form) == len(ids), type(form)
            assert (await store.save_prefix(spec, form, kv)).chunks_written == 0, type(form)
            hit = await store.load_prefix(spec, form)
            assert hit.num_tokens == len(ids), type(form)
            assert_kv_equal(hit.kv, kv)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
async def test_load_onto_device(
    store_url: tuple[str, Any],
    device: str,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec(torch.bfloat16)
    prompt = list(range(CT + 3))
    kv = make_kv(spec, len(prompt))
    async with _open(store_url) as store:
        await store.save_prefix(spec, prompt, [(k.to(device), v.to(device)) for k, v in kv])
        hit = await store.load_prefix(spec, prompt, device=device)
        miss = await store.load_prefix(spec, [9, 9, 9], device=torch.device(device))
    assert hit.num_tokens == len(prompt)
    assert all(t.device.type == device for pair in hit.kv for t in pair)
    assert all(t.device.type == device for pair in miss.kv for t in pair)
    assert_kv_equal(hit.kv, kv)
