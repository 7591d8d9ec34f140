"""Layer-pipelined loading: ``load_prefix_layers`` yields layers in order as each completes.

Timing is checked with gates, never the wall clock: a backend holds the GETs of
chosen layers until the test opens the gate, so "layer 0 arrives while later
layers are in flight" is a fact the test observes, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _damage_helpers import chunks_of, flip, raw_store, read_data
from _gates import GATE_TIMEOUT, only_this_task, wait_held

import kvstore
from kvstore.errors import StoreUnavailableError
from kvstore.storage import LocalObjectStore, ObjectStore, open_object_store

CT = 16
N_CHUNKS = 4
Spec = kvstore.ModelSpec
KV = list[tuple[torch.Tensor, torch.Tensor]]


def _spec(make_spec: Callable[..., Spec], num_layers: int = 4) -> Spec:
    return make_spec(torch.bfloat16, name="layers", num_layers=num_layers)


def _tokens(n: int = N_CHUNKS * CT + 5) -> list[int]:
    return list(range(50_000, 50_000 + n))


async def _saved(store_url: tuple[str, Any], spec: Spec, kv: KV, tokens: list[int], codec: str = "none") -> None:
    url, options = store_url
    async with kvstore.open(url, storage_options=options, chunk_tokens=CT, codec=codec) as store:
        await store.save_prefix(spec, tokens, kv)


async def _store(store_url: tuple[str, Any], wrap: Callable[[ObjectStore], ObjectStore], **options: Any) -> Any:
    backend = wrap(await open_object_store(*store_url))
    return kvstore.KVStore(backend, kvstore.StoreOptions(chunk_tokens=CT, **options))


# ---------------------------------------------------------------------- order and bits


@pytest.mark.parametrize("codec", ["none", "lz4"])
async def test_layers_come_in_order_and_bit_exact(
    store_url: tuple[str, Any],
    codec: str,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = _spec(make_spec)
    tokens = _tokens()
    kv = make_kv(spec, len(tokens))
    await _saved(store_url, spec, kv, tokens, codec)
    url, options = store_url
    async with kvstore.open(url, storage_options=options, chunk_tokens=CT) as store:
        got: KV = []
        async with store.load_prefix_layers(spec, [*tokens[:-3], 7, 7, 7]) as layers:  # the tail does not match
            async for layer, k, v in layers:
                assert layer == len(got)
                got.append((k, v))
            assert layers.num_tokens == N_CHUNKS * CT
            assert layers.chunks_done == N_CHUNKS
            assert layers.chunks_damaged == 0
        assert_kv_equal(got, [(k[: N_CHUNKS * CT], v[: N_CHUNKS * CT]) for k, v in kv])

        before = store.stats()
        stream = store.load_prefix_layers(spec, tokens)
        got = [(k, v) async for _, k, v in stream]
        assert_kv_equal(got, kv)
        assert stream.num_tokens == len(tokens)
        after = store.stats()
        assert after.loads - before.loads == 1
        assert after.chunks_loaded - before.chunks_loaded == N_CHUNKS + 1
        assert after.bytes_read - before.bytes_read == stream.bytes_read > 0

        hit = await store.load_prefix(spec, tokens)  # the same loader underneath
        assert_kv_equal(hit.kv, got)


async def test_miss_yields_nothing(store_url: tuple[str, Any], make_spec: Callable[..., Spec]) -> None:
    url, options = store_url
    async with kvstore.open(url, storage_options=options, chunk_tokens=CT) as store:
        stream = store.load_prefix_layers(_spec(make_spec), _tokens())
        assert [item async for item in stream] == []
        assert stream.num_tokens == 0
        assert only_this_task()


async def test_bad_input_fails_at_the_call(store_url: tuple[str, Any], make_spec: Callable[..., Spec]) -> None:
    url, options = store_url
    async with kvstore.open(url, storage_options=options, chunk_tokens=CT) as store:
        with pytest.raises(kvstore.InvalidInputError):
            store.load_prefix_layers("not a spec", _tokens())  # type: ignore[arg-type]
        with pytest.raises(kvstore.InvalidInputError):
            store.load_prefix_layers(_spec(make_spec), _tokens(), device="nonsense")


# ---------------------------------------------------------------------- pipelining and schedule


async def test_first_layer_arrives_while_later_layers_are_in_flight(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    gated_store: type,
) -> None:
    spec = _spec(make_spec)
    tokens = _tokens()
    kv = make_kv(spec, len(tokens))
    await _saved(store_url, spec, kv, tokens)
    later = range(1, spec.num_layers)
    backend: Any = None

    def wrap(inner: ObjectStore) -> ObjectStore:
        nonlocal backend
        backend = gated_store(inner, gated=later)
        return backend  # type: ignore[no-any-return]

    store = await _store(store_url, wrap)
    try:
        async with store.load_prefix_layers(spec, tokens) as layers:
            async with asyncio.timeout(GATE_TIMEOUT):  # would hang if layer 0 waited for the later layers
                layer, k, v = await anext(layers)
            assert layer == 0
            assert_kv_equal([(k, v)], kv[:1])
            await wait_held(backend)  # the later layers' reads wait at their gate ...
            assert layers.chunks_done == 0  # ... so no chunk is complete yet
            backend.open_all()
            rest = [(k, v) async for _, k, v in layers]
        assert_kv_equal([(k, v), *rest], kv)
    finally:
        await store.close()


async def test_every_chunks_layer_0_is_read_before_any_later_layer(
    tmp_path: Path, make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    """One request at a time makes the schedule exact: every chunk's head with layer 0, then the rest."""
    spec = _spec(make_spec)
    tokens = _tokens()
    await _saved((str(tmp_path / "kv"), None), spec, make_kv(spec, len(tokens)), tokens)
    backend = gated_store(LocalObjectStore(tmp_path / "kv"))
    store = kvstore.KVStore(backend, kvstore.StoreOptions(chunk_tokens=CT, max_concurrency=1))
    try:
        async with store.load_prefix_layers(spec, tokens) as layers:
            assert [layer async for layer, _, _ in layers] == list(range(spec.num_layers))
    finally:
        await store.close()
    n = N_CHUNKS + 1
    # per chunk: the head (index and header) with layer 0 (one request), then layers 1.. (one preadv)
    assert backend.order == [0] * n + [1] * n


# ---------------------------------------------------------------------- leaving early


async def test_leaving_early_cancels_outstanding_requests(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _tokens()
    await _saved(store_url, spec, make_kv(spec, len(tokens)), tokens)
    backend: Any = None

    def wrap(inner: ObjectStore) -> ObjectStore:
        nonlocal backend
        backend = gated_store(inner, gated=range(1, spec.num_layers))
        return backend  # type: ignore[no-any-return]

    store = await _store(store_url, wrap)
    try:
        async with store.load_prefix_layers(spec, tokens) as layers:
            async for layer, _, _ in layers:
                assert layer == 0
                assert not only_this_task()  # later layers are in flight ...
                break
        assert only_this_task()  # ... and cancelled and awaited on leaving the block
        assert backend.held == 0
        assert await anext(layers, None) is None  # a closed stream stays ended
        assert store.stats().bytes_read == layers.bytes_read > 0
    finally:
        await store.close()


async def test_abandoned_stream_is_cancelled_when_collected(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _tokens()
    await _saved(store_url, spec, make_kv(spec, len(tokens)), tokens)
    store = await _store(store_url, lambda inner: gated_store(inner, gated=range(1, spec.num_layers)))
    try:
        async for layer, _, _ in store.load_prefix_layers(spec, tokens):  # a bare loop, no async with
            assert layer == 0
            break
        for _ in range(100):  # the stream was dropped: its requests were cancelled, they unwind in a few steps
            if only_this_task():
                break
            await asyncio.sleep(0)
        assert only_this_task()
    finally:
        await store.close()


async def test_cancelling_the_consumer_cancels_everything(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _tokens()
    await _saved(store_url, spec, make_kv(spec, len(tokens)), tokens)
    backend: Any = None

    def wrap(inner: ObjectStore) -> ObjectStore:
        nonlocal backend
        backend = gated_store(inner, gated=[1])
        return backend  # type: ignore[no-any-return]

    store = await _store(store_url, wrap)
    seen: list[int] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for layer, _, _ in store.load_prefix_layers(spec, tokens):
            seen.append(layer)
            if layer == 0:
                first.set()

    try:
        task = asyncio.create_task(consume())
        async with asyncio.timeout(GATE_TIMEOUT):
            await first.wait()
        await wait_held(backend)  # the reads of the later layers wait at their gate
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == [0]
        assert only_this_task()
        assert backend.held == 0
    finally:
        await store.close()


async def test_store_failure_mid_stream_is_raised_and_cleans_up(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _tokens()
    await _saved(store_url, spec, make_kv(spec, len(tokens)), tokens)
    backend: Any = None

    def wrap(inner: ObjectStore) -> ObjectStore:
        nonlocal backend
        backend = gated_store(inner, gated=[1])
        return backend  # type: ignore[no-any-return]

    store = await _store(store_url, wrap)
    try:
        layers = store.load_prefix_layers(spec, tokens)
        assert (await anext(layers))[0] == 0
        backend.fail_layer = 1  # every layer-1 GET is held at its gate, then fails
        backend.open_all()
        with pytest.raises(StoreUnavailableError, match="injected"):
            await anext(layers)
        assert only_this_task()
        assert await anext(layers, None) is None
        backend.fail_layer = None
        assert (await store.load_prefix(spec, tokens)).num_tokens == len(tokens)  # nothing is poisoned
    finally:
        await store.close()


# ---------------------------------------------------------------------- damage mid-stream


@pytest.mark.parametrize(("bad_chunk", "codec"), [(2, "none"), (2, "lz4"), (0, "none")])
async def test_damage_found_mid_stream_shrinks_num_tokens(
    store_url: tuple[str, Any],
    bad_chunk: int,
    codec: str,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    gated_store: type,
) -> None:
    spec = _spec(make_spec, num_layers=3)
    tokens = _tokens()
    kv = make_kv(spec, len(tokens))
    await _saved(store_url, spec, kv, tokens, codec)
    url, _ = store_url
    damaged_layer = 2
    key, prefix = chunks_of(spec, tokens, CT)[bad_chunk]
    async with raw_store(url) if store_url[1] is None else _raw(store_url) as raw:
        data, head = await read_data(raw, prefix, spec)
        span = head.spans[damaged_layer]
        await raw.put(prefix, flip(data, (span.offset + span.end) // 2))
    backend: Any = None

    def wrap(inner: ObjectStore) -> ObjectStore:
        nonlocal backend
        backend = gated_store(inner, gated=[1])  # layer 0 comes before the damage in layer 2 is seen
        return backend  # type: ignore[no-any-return]

    store = await _store(store_url, wrap, codec=codec)
    try:
        layers = store.load_prefix_layers(spec, tokens)
        got: KV = []
        async with layers:
            async for layer, k, v in layers:
                assert layers.num_tokens == k.shape[0] == v.shape[0]
                got.append((k, v))
                if layer == 0:
                    assert layers.num_tokens == len(tokens)  # not known yet
                    backend.open_all()
        cut = key.start
        assert layers.num_tokens == cut
        assert layers.chunks_damaged == 1
        assert [k.shape[0] for k, _ in got] == [len(tokens)] + ([cut] * (spec.num_layers - 1) if cut else [])
        assert_kv_equal([(k[:cut], v[:cut]) for k, v in got], [(k[:cut], v[:cut]) for k, v in kv][: len(got)])
        assert store.stats().chunks_damaged == 1
        assert store.stats().chunks_loaded == bad_chunk
        assert only_this_task()
        # The damaged chunk's data object was deleted (repair), so the next load stops before it at once.
        hit = await store.load_prefix(spec, tokens)
        assert hit.num_tokens == cut
        assert hit.chunks_damaged == 0
        assert_kv_equal(hit.kv, [(k[:cut], v[:cut]) for k, v in kv])
    finally:
        await store.close()


class _raw:
    """``raw_store`` for a URL with storage options (S3)."""

    def __init__(self, store_url: tuple[str, Any]) -> None:
        self._url = store_url

    async def __aenter__(self) -> ObjectStore:
        self._backend = await open_object_store(*self._url)
        return self._backend

    async def __aexit__(self, *exc: object) -> None:
        await self._backend.close()


# ---------------------------------------------------------------------- sync facade


def test_sync_facade_iterates_layers(
    tmp_path: Path,
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = _spec(make_spec)
    tokens = _tokens()
    kv = make_kv(spec, len(tokens))
    with kvstore.sync.open(tmp_path / "kv", chunk_tokens=CT) as store:
        store.save_prefix(spec, tokens, kv)
        got = [(k, v) for _, k, v in store.load_prefix_layers(spec, tokens)]
        assert_kv_equal(got, kv)
        for layer, _, _ in store.load_prefix_layers(spec, tokens):  # leaving early closes the stream
            assert layer == 0
            break
        assert store.load_prefix(spec, tokens).num_tokens == len(tokens)


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_a_first_range_short_of_layer_0_still_completes(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first ranged read of a chunk is sized from a guess of its header; when it falls short of layer 0
    (a header longer than guessed), that chunk must not wait for its own layer 0 before reading the rest."""
    import kvstore.reading

    spec = _spec(make_spec)
    tokens = _tokens()
    kv = make_kv(spec, len(tokens))
    await _saved(store_url, spec, kv, tokens)
    raw = 2 * CT * spec.row_bytes
    monkeypatch.setattr(kvstore.reading, "_HEADER_GUESS", 64 - raw // 255 - 20)  # ends inside layer 0
    store = await _store(store_url, lambda inner: inner)
    try:
        async with asyncio.timeout(GATE_TIMEOUT), store.load_prefix_layers(spec, tokens) as layers:
            got = [(k, v) async for _, k, v in layers]
        assert_kv_equal(got, kv)
    finally:
        await store.close()
