"""Tenant namespaces: a key prefix of their own, no shared chunks, no hits across."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import kvstore
from kvstore import gc as kvgc
from kvstore.storage import open_object_store


async def _keys(url: str, options: Any) -> list[str]:
    backend = await open_object_store(url, options)
    try:
        return [m.key async for m in backend.list("")]
    finally:
        await backend.close()


async def test_the_same_prompt_in_two_namespaces_is_stored_twice_and_never_hits_across(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    url, options = store_url
    spec = make_spec()
    tokens = list(range(48))
    kv = make_kv(spec, len(tokens))
    async with kvstore.open(url, storage_options=options, namespace="tenant-a", chunk_tokens=16) as a:
        saved_a = await a.save_prefix(spec, tokens, kv)
    async with kvstore.open(url, storage_options=options, namespace="tenant-b", chunk_tokens=16) as b:
        assert await b.lookup(spec, tokens) == 0
        miss = await b.load_prefix(spec, tokens)
        assert miss.num_tokens == 0
        saved_b = await b.save_prefix(spec, tokens, kv)
        hit = await b.load_prefix(spec, tokens)
    assert saved_a.chunks_written == saved_b.chunks_written == 3
    assert saved_b.chunks_skipped == 0
    assert_kv_equal(hit.kv, kv)

    keys = await _keys(url, options)
    assert keys, "nothing was written"
    assert all(k.startswith(("namespaces/tenant-a/", "namespaces/tenant-b/")) for k in keys)
    a_keys = {k.removeprefix("namespaces/tenant-a/") for k in keys if k.startswith("namespaces/tenant-a/")}
    b_keys = {k.removeprefix("namespaces/tenant-b/") for k in keys if k.startswith("namespaces/tenant-b/")}
    assert len(a_keys) == len(b_keys) > 0


async def test_gc_of_one_namespace_leaves_the_others_alone(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, options = store_url
    spec = make_spec()
    tokens = list(range(32))
    for ns in ("a", "b"):
        async with kvstore.open(url, storage_options=options, namespace=ns, chunk_tokens=16) as store:
            await store.save_prefix(spec, tokens, make_kv(spec, len(tokens)))
            if ns == "a":
                await store.retire(spec.name, spec.version)
    report = await kvgc.run_gc(
        kvstore.opening.namespace_url(url, "a"), storage_options=options, grace=0, allow_short_grace=True
    )  # type: ignore[arg-type]
    assert report.freed_objects > 0
    async with kvstore.open(url, storage_options=options, namespace="b") as b:
        assert await b.lookup(spec, tokens) == 32
    # A GC of the parent store never reaches into namespaces.
    async with kvstore.open(url, storage_options=options, chunk_tokens=16):
        pass
    before = await _keys(url, options)
    await kvgc.run_gc(url, storage_options=options, grace=0, allow_short_grace=True)
    assert await _keys(url, options) == before


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "x" * 65, "tenant a", "é", 7])
def test_unsafe_namespace_names_are_refused(bad: Any) -> None:
    with pytest.raises(kvstore.InvalidInputError):
        kvstore.open("somewhere", namespace=bad)
