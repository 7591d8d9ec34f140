"""Cache tiers: host memory and a local disk in front of the source of truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvstore

CHUNK = 16


@pytest.mark.parametrize("backend", ["local", "memory"], indirect=True)
async def test_memory_tier_serves_repeated_loads_without_the_source(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    url, options = store_url
    spec = make_spec()
    tokens = list(range(40))
    kv = make_kv(spec, 40)
    async with kvstore.open(url, storage_options=options, chunk_tokens=CHUNK, memory_cache_bytes=1 << 24) as store:
        await store.save_prefix(spec, tokens, kv)
        first = await store.load_prefix(spec, tokens)
        before = store.stats()
        second = await store.load_prefix(spec, tokens)
        after = store.stats()
    assert_kv_equal(first.kv, kv)
    assert_kv_equal(second.kv, kv)
    objects = 3 * (spec.num_layers + 1)  # layer objects and commit records of three chunks
    assert after.memory_hits - before.memory_hits == objects
    assert after.source_reads == before.source_reads
    assert after.tier_hit_rate >= 0.5


async def test_memory_tier_stays_within_its_budget(
    tmp_path: Path, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    spec = make_spec()
    kv = make_kv(spec, 64)
    budget = spec.bytes_per_token * 20
    async with kvstore.open(str(tmp_path / "kv"), chunk_tokens=CHUNK, memory_cache_bytes=budget) as store:
        await store.save_prefix(spec, list(range(64)), kv)
        for _ in range(2):
            assert_kv_equal((await store.load_prefix(spec, list(range(64)))).kv, kv)
        tiers = store._backend
        assert tiers._memory.used <= budget  # type: ignore[attr-defined]
        assert store.stats().memory_evictions > 0


@pytest.mark.s3
async def test_disk_tier_in_front_of_s3_serves_a_new_process_and_catches_damage(
    s3_store_url: Any,
    tmp_path: Path,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
) -> None:
    url, options = s3_store_url
    cache = tmp_path / "nvme"
    spec = make_spec()
    tokens = list(range(48))
    kv = make_kv(spec, 48)
    async with kvstore.open(url, storage_options=options, chunk_tokens=CHUNK, cache_url=str(cache)) as store:
        await store.save_prefix(spec, tokens, kv)  # writes go through to S3, then to the disk tier

    async with kvstore.open(url, storage_options=options, cache_url=str(cache)) as store:
        hit = await store.load_prefix(spec, tokens)
        stats = store.stats()
    assert_kv_equal(hit.kv, kv)
    assert stats.disk_hits == 3 * (spec.num_layers + 1) + 1  # and the root record read by open
    assert stats.source_reads == 0

    # A damaged cache copy is caught by the checksums like damage at the source: never a wrong tensor.
    layer_files = sorted(p for p in cache.rglob("c.0.0.0.0.0") if p.is_file())
    assert len(layer_files) == 3
    for path in layer_files:
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    async with kvstore.open(url, storage_options=options, cache_url=str(cache), repair=False) as store:
        damaged = await store.load_prefix(spec, tokens)
    assert damaged.num_tokens < 48
    assert damaged.chunks_damaged == 1
    n = damaged.num_tokens
    assert_kv_equal(damaged.kv, [(k[:n], v[:n]) for k, v in kv])

    async with kvstore.open(url, storage_options=options) as store:  # the source itself is intact
        assert_kv_equal((await store.load_prefix(spec, tokens)).kv, kv)
