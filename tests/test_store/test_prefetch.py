"""Prefetch: loads started ahead of need, joined by ``load_prefix``, bounded in bytes, cancellable.

Request counts come from the conftest counting store; "in flight" is made
certain with gates (every chunk's first read held until the test opens them), never timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _gates import only_this_task, wait_held

import kvstore
from kvstore.errors import StoreUnavailableError
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.prefetch import prefetch_key
from kvstore.storage import open_object_store

CT = 16
Spec = kvstore.ModelSpec
KV = list[tuple[torch.Tensor, torch.Tensor]]
N_TOKENS = 3 * CT + 4  # three full chunks and a tail


def _one_load(backend: Any) -> int:
    """Reads of one whole load of the prompt's 4 chunks: one GET each (a local file: pread of the head + preadv)."""
    return 4


def _spec(make_spec: Callable[..., Spec]) -> Spec:
    return make_spec(torch.bfloat16, name="prefetch", num_layers=2)


def _prompt(i: int) -> list[int]:
    return list(range(1000 * (i + 1), 1000 * (i + 1) + N_TOKENS))


def _bound(spec: Spec, n: int = N_TOKENS) -> int:
    """What a prefetch of ``n`` tokens is charged while it runs."""
    return 2 * spec.num_layers * n * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize


async def _save(store_url: tuple[str, Any], spec: Spec, prompts: list[tuple[list[int], KV]]) -> None:
    url, options = store_url
    async with kvstore.open(url, storage_options=options, chunk_tokens=CT) as store:
        for tokens, kv in prompts:
            await store.save_prefix(spec, tokens, kv)


async def _open(store_url: tuple[str, Any], backend_type: type, gated: tuple[int, ...] = (), **options: Any) -> Any:
    backend = backend_type(await open_object_store(*store_url), gated=gated)
    return backend, kvstore.KVStore(backend, kvstore.StoreOptions(chunk_tokens=CT, **options))


def _gets(backend: Any) -> int:
    return int(backend.calls["get"] + backend.calls["get_into"])


async def test_load_claims_a_finished_prefetch_without_requests(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    gated_store: type,
) -> None:
    spec = _spec(make_spec)
    tokens, kv = _prompt(0), make_kv(spec, N_TOKENS)
    await _save(store_url, spec, [(tokens, kv)])
    backend, store = await _open(store_url, gated_store)
    try:
        handle = store.prefetch(spec, tokens)
        assert store.prefetch(spec, tokens) is handle  # the same work, not a second one
        result = await handle
        assert handle.done()
        assert (handle.chunks_done, handle.bytes_done) == (4, result.bytes_read)
        assert result.bytes_read > 0
        assert_kv_equal(result.kv, kv)
        backend.reset()
        before = store.stats()
        hit = await store.load_prefix(spec, tokens)
        assert dict(backend.calls) == {}  # not a single request: the prefetch is claimed
        assert hit is result
        assert store.stats().loads == before.loads
        backend.reset()
        await store.load_prefix(spec, tokens)  # claimed means taken: the next load reads again
        assert _gets(backend) == _one_load(backend)
    finally:
        await store.close()


async def test_load_joins_a_prefetch_in_flight(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    gated_store: type,
) -> None:
    spec = _spec(make_spec)
    tokens, kv = _prompt(0), make_kv(spec, N_TOKENS)
    await _save(store_url, spec, [(tokens, kv)])
    backend, store = await _open(store_url, gated_store, gated=(0,))
    try:
        handle = store.prefetch(spec, tokens, device="cpu")
        loading = asyncio.create_task(store.load_prefix(spec, tokens, device=torch.device("cpu")))
        await wait_held(backend, 4)  # every chunk's first read is waiting at the gate
        assert handle.chunks_done == 0  # no chunk has its layer 1 yet
        backend.open_all()
        hit = await loading
        assert _gets(backend) == _one_load(backend)  # one load's requests, shared by prefetch and load
        assert hit is await handle
        assert (handle.chunks_done, handle.bytes_done) == (4, hit.bytes_read)
        assert_kv_equal(hit.kv, kv)
        assert only_this_task()
    finally:
        await store.close()


async def test_cancel_frees_and_leaves_no_task(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    gated_store: type,
) -> None:
    spec = _spec(make_spec)
    tokens, kv = _prompt(0), make_kv(spec, N_TOKENS)
    await _save(store_url, spec, [(tokens, kv)])
    backend, store = await _open(store_url, gated_store, gated=(0,))
    try:
        handle = store.prefetch(spec, tokens)
        await wait_held(backend)
        assert store._prefetches.used == _bound(spec)
        assert handle.cancel()
        assert store._prefetches.used == 0
        assert len(store._prefetches) == 0
        with pytest.raises(asyncio.CancelledError):
            await handle
        assert handle.cancelled()
        assert only_this_task()
        assert backend.held == 0
        backend.open_all()
        backend.reset()
        hit = await store.load_prefix(spec, tokens)  # nothing to join: loads by itself
        assert hit.num_tokens == N_TOKENS
        assert _gets(backend) == _one_load(backend)
    finally:
        await store.close()


async def test_cancelling_an_awaiter_keeps_the_prefetch(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _prompt(0)
    await _save(store_url, spec, [(tokens, make_kv(spec, N_TOKENS))])
    backend, store = await _open(store_url, gated_store, gated=(0,))
    try:
        handle = store.prefetch(spec, tokens)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await handle
        assert not handle.done()
        backend.open_all()
        assert (await handle).num_tokens == N_TOKENS
    finally:
        await store.close()


async def test_budget_drops_the_oldest_unclaimed(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    gated_store: type,
) -> None:
    spec = _spec(make_spec)
    prompts = [(_prompt(i), make_kv(spec, N_TOKENS, seed=i)) for i in range(3)]
    await _save(store_url, spec, prompts)
    backend, store = await _open(store_url, gated_store, gated=(0,), prefetch_budget=2 * _bound(spec))
    try:
        handles = [store.prefetch(spec, tokens) for tokens, _ in prompts]
        assert len(store._prefetches) == 2  # the third did not fit next to the first two: the first went
        assert (
            store._prefetches.claim(prefetch_key(model_id(spec), normalize_tokens(prompts[0][0]), torch.device("cpu")))
            is None
        )
        assert not handles[1].done()
        assert store._prefetches.used <= store._prefetches.budget
        backend.open_all()
        for handle in handles[1:]:
            await handle
        with pytest.raises(asyncio.CancelledError):
            await handles[0]
        backend.reset()
        for (tokens, kv), gets in zip(prompts, [_one_load(backend), 0, 0], strict=True):
            hit = await store.load_prefix(spec, tokens)
            assert_kv_equal(hit.kv, kv)
            assert _gets(backend) == gets
            backend.reset()
        assert store._prefetches.used == 0
        assert only_this_task()
    finally:
        await store.close()


async def test_a_finished_prefetch_is_charged_its_real_size(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _prompt(0)
    await _save(store_url, spec, [(tokens[: 2 * CT], make_kv(spec, 2 * CT))])  # only two chunks are stored
    _, store = await _open(store_url, gated_store)
    try:
        hit = await store.prefetch(spec, tokens)
        assert hit.num_tokens == 2 * CT
        assert store._prefetches.used == _bound(spec, 2 * CT) < _bound(spec)
    finally:
        await store.close()


async def test_a_prefetch_larger_than_the_budget_is_not_started(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _prompt(0)
    await _save(store_url, spec, [(tokens, make_kv(spec, N_TOKENS))])
    backend, store = await _open(store_url, gated_store, prefetch_budget=_bound(spec) - 1)
    try:
        backend.reset()
        handle = store.prefetch(spec, tokens)
        assert handle.cancelled()
        assert (handle.chunks_done, handle.bytes_done) == (0, 0)
        assert dict(backend.calls) == {}
        assert (await store.load_prefix(spec, tokens)).num_tokens == N_TOKENS
    finally:
        await store.close()


async def test_a_failed_prefetch_does_not_poison_the_load(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    gated_store: type,
) -> None:
    spec = _spec(make_spec)
    tokens, kv = _prompt(0), make_kv(spec, N_TOKENS)
    await _save(store_url, spec, [(tokens, kv)])
    backend, store = await _open(store_url, gated_store)
    try:
        backend.fail_layer = 0  # the store "goes away" during the prefetch
        handle = store.prefetch(spec, tokens)
        with pytest.raises(StoreUnavailableError):
            await handle
        assert len(store._prefetches) == 0  # a failure is dropped, never served
        backend.fail_layer = None
        hit = await store.load_prefix(spec, tokens)
        assert_kv_equal(hit.kv, kv)

        backend.fail_layer = 0  # claimed while running, then failing: the load retries by itself
        handle = store.prefetch(spec, tokens)
        loading = asyncio.create_task(store.load_prefix(spec, tokens))
        with pytest.raises(StoreUnavailableError):
            await handle
        backend.fail_layer = None
        assert_kv_equal((await loading).kv, kv)
    finally:
        await store.close()


async def test_cancelling_a_joining_load_cancels_the_claimed_prefetch(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    tokens = _prompt(0)
    await _save(store_url, spec, [(tokens, make_kv(spec, N_TOKENS))])
    backend, store = await _open(store_url, gated_store, gated=(0,))
    try:
        handle = store.prefetch(spec, tokens)
        loading = asyncio.create_task(store.load_prefix(spec, tokens))
        await wait_held(backend)
        loading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loading
        assert handle.cancelled()
        assert only_this_task()
    finally:
        await store.close()


async def test_close_cancels_prefetches(
    store_url: tuple[str, Any], make_spec: Callable[..., Spec], make_kv: Callable[..., KV], gated_store: type
) -> None:
    spec = _spec(make_spec)
    prompts = [(_prompt(i), make_kv(spec, N_TOKENS, seed=i)) for i in range(2)]
    await _save(store_url, spec, prompts)
    _, store = await _open(store_url, gated_store, gated=(0,))
    handles = [store.prefetch(spec, tokens) for tokens, _ in prompts]
    await asyncio.sleep(0)
    await store.close()
    assert all(h.cancelled() for h in handles)
    assert only_this_task()
    with pytest.raises(kvstore.StoreUnavailableError):
        store.prefetch(spec, prompts[0][0])


def test_prefetch_budget_is_checked() -> None:
    with pytest.raises(kvstore.InvalidInputError):
        kvstore.StoreOptions(prefetch_budget=-1)
    with pytest.raises(kvstore.InvalidInputError):
        kvstore.StoreOptions(prefetch_budget=True)
    assert kvstore.StoreOptions().prefetch_budget == 1 << 30


async def test_a_deadline_while_joined_returns_what_is_complete_and_leaves_the_prefetch(
    store_url: tuple[str, Any],
    make_spec: Callable[..., Spec],
    make_kv: Callable[..., KV],
    assert_kv_equal: Callable[..., None],
    slice_kv: Callable[..., KV],
    gated_store: type,
) -> None:
    """``load_prefix(timeout=)`` joined to a prefetch: the chunks complete by the deadline, and the prefetch
    runs on for whoever else awaits it (and for a later load, which claims it without a request)."""
    spec = _spec(make_spec)
    tokens, kv = _prompt(0), make_kv(spec, N_TOKENS)
    await _save(store_url, spec, [(tokens, kv)])
    last = chunk_keys(spec, normalize_tokens(tokens), CT)[-1]
    last_path = data_path(model_id(spec), last.digest, last.num_tokens)
    backend, store = await _open(store_url, gated_store)
    hold = asyncio.Event()
    read = backend.get, backend.get_range, backend.get_range_into, backend.get_planned

    def held(call: Any) -> Any:  # the reads of the last chunk (the tail) wait until the test lets them go
        async def wrapper(key: str, *args: Any, **kwargs: Any) -> Any:
            if key.endswith(last_path):
                await hold.wait()
            return await call(key, *args, **kwargs)

        return wrapper

    backend.get, backend.get_range, backend.get_range_into, backend.get_planned = (held(c) for c in read)
    try:
        handle = store.prefetch(spec, tokens)
        async with asyncio.timeout(10):
            while handle.chunks_done < 3:  # noqa: ASYNC110 - progress has no event; the tail is held
                await asyncio.sleep(0.01)
        hit = await store.load_prefix(spec, tokens, timeout=0.2)
        assert (hit.num_tokens, hit.chunks_loaded) == (3 * CT, 3)
        assert_kv_equal(hit.kv, slice_kv(kv, 3 * CT))
        assert store.stats().loads_timed_out == 1
        assert not handle.done()  # still running for its other users
        assert store.has_prefetch(spec, tokens)  # and back in the buffer for a later load
        hold.set()
        whole = await handle
        assert whole.num_tokens == N_TOKENS
        backend.reset()
        again = await store.load_prefix(spec, tokens)
        assert again is whole
        assert dict(backend.calls) == {}  # claimed, not read again
    finally:
        hold.set()
        await store.close()
