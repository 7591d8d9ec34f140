"""Cache tiers: host memory and a local disk in front of the source of truth."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvstore
from kvstore.errors import InvalidInputError, ObjectNotFoundError
from kvstore.formats.layout import (
    ROOT_RECORD,
    data_path,
    is_cacheable,
    metadata_path,
    model_record_path,
    retirement_record_path,
    tails_prefix,
)
from kvstore.storage import LocalObjectStore
from kvstore.storage.disk_tier import DiskTier, source_identity
from kvstore.storage.resilient import ResilientObjectStore
from kvstore.storage.tiers import TieredObjectStore

CHUNK = 16
MID = bytes(range(16))
DATA_KEY = data_path(MID, bytes(32), CHUNK)  # a chunk's data object: cacheable in every format version


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def _tiers(tmp_path: Path, *, memory: int = 1 << 20, disk: int = 1 << 20) -> tuple[TieredObjectStore, Path]:
    """Tiers over a local source at ``tmp_path/source``, the disk tier's files, and its directory."""
    source = LocalObjectStore(tmp_path / "source")
    tier = await DiskTier.open(tmp_path / "cache", source_identity(source.url), disk)
    return TieredObjectStore(source, cacheable=is_cacheable, memory_budget=memory, disk=tier), tier.root


# ---------------------------------------------------------------------- damaged copies (issue 11, defect 2)


async def test_a_dropped_copy_is_read_again_from_the_source_which_is_untouched(tmp_path: Path) -> None:
    tiers, cache = await _tiers(tmp_path)
    good = b"sound bytes " * 10
    await tiers.put(DATA_KEY, good)
    assert _files(cache) == {DATA_KEY: good}  # writes go through to the disk tier
    damaged = bytearray(good)
    damaged[0] ^= 0xFF
    (cache / DATA_KEY).write_bytes(bytes(damaged))

    assert await tiers.get(DATA_KEY) == bytes(damaged)  # the tier serves its (damaged) copy ...
    assert await tiers.get(DATA_KEY) == bytes(damaged)  # ... and memory now holds it too
    assert tiers.tier_stats.source_reads == 0
    await tiers.drop_cached(DATA_KEY)
    assert await tiers.get(DATA_KEY) == good  # read again from the source
    stats = tiers.tier_stats
    assert (stats.disk_hits, stats.memory_hits, stats.source_reads) == (1, 1, 1)
    assert (tmp_path / "source" / DATA_KEY).read_bytes() == good  # dropping a copy never deletes at the source
    assert _files(cache) == {DATA_KEY: good}  # the disk tier was refilled with the source's bytes
    assert await tiers.get(DATA_KEY) == good
    assert tiers.tier_stats.memory_hits == 2


@pytest.mark.parametrize("memory", [0, 1 << 20])
async def test_ranges_come_from_the_tiers_and_a_damaged_copy_is_read_again(tmp_path: Path, memory: int) -> None:
    tiers, cache = await _tiers(tmp_path, memory=memory)
    good = bytes(range(256)) * 4
    await tiers.put(DATA_KEY, good)
    assert await tiers.get_range(DATA_KEY, 10, 20) == good[10:20]
    assert await tiers.get_range(DATA_KEY, 1000, 2000) == good[1000:]  # past the end: what there is
    stats = tiers.tier_stats
    if memory:  # the first range reads the whole copy into memory, which serves the second
        assert (stats.disk_hits, stats.disk_bytes, stats.memory_hits) == (1, 10, 1)
    else:  # without memory each range is read alone
        assert (stats.disk_hits, stats.disk_bytes, stats.memory_hits) == (2, 34, 0)
    (cache / DATA_KEY).write_bytes(b"\0" * len(good))
    await tiers.drop_cached(DATA_KEY)
    buf = bytearray(16)
    assert await tiers.get_range_into(DATA_KEY, 100, [memoryview(buf)]) == 16
    assert bytes(buf) == good[100:116]
    assert tiers.tier_stats.source_reads == 1
    assert _files(cache) == {DATA_KEY: good}  # the source read refilled the tier with the whole object


async def test_a_read_in_flight_when_a_copy_is_dropped_does_not_refill_the_tiers(tmp_path: Path) -> None:
    tiers, cache = await _tiers(tmp_path)
    await tiers.source.put(DATA_KEY, b"old")
    release = asyncio.Event()
    read = tiers.source.get

    async def gated_get(key: str) -> bytes:
        data = await read(key)
        await release.wait()
        return data

    tiers.source.get = gated_get  # type: ignore[method-assign]
    in_flight = asyncio.create_task(tiers.get(DATA_KEY))
    await asyncio.sleep(0.05)
    await tiers.drop_cached(DATA_KEY)
    await tiers.source.put(DATA_KEY, b"new")  # e.g. rewritten after a repair
    release.set()
    assert await in_flight == b"old"
    assert _files(cache) == {}
    assert await tiers.get(DATA_KEY) == b"new"  # the next read after the drop reached the source


async def test_a_delete_at_the_source_drops_every_cached_copy(tmp_path: Path) -> None:
    tiers, cache = await _tiers(tmp_path)
    await tiers.put(DATA_KEY, b"data")
    assert await tiers.get(DATA_KEY) == b"data"
    await tiers.delete([DATA_KEY])
    assert _files(cache) == {}
    assert not (tmp_path / "source" / DATA_KEY).exists()
    with pytest.raises(ObjectNotFoundError):
        await tiers.get(DATA_KEY)


async def test_drop_cached_reaches_the_tiers_through_the_retry_layer(tmp_path: Path) -> None:
    tiers, cache = await _tiers(tmp_path)
    await tiers.put(DATA_KEY, b"data")
    wrapped = ResilientObjectStore(tiers)
    assert wrapped.has_cache_tiers
    assert not ResilientObjectStore(tiers.source).has_cache_tiers
    await wrapped.drop_cached(DATA_KEY)
    assert _files(cache) == {}


# ---------------------------------------------------------------------- records are never cached


RECORDS = [
    ROOT_RECORD,
    model_record_path(MID),
    retirement_record_path(MID),
    f"{tails_prefix(MID, bytes(32))}7",
]


def test_only_chunk_data_is_cacheable() -> None:
    assert is_cacheable(DATA_KEY)
    assert is_cacheable(metadata_path(MID, CHUNK))
    array = DATA_KEY.rsplit("/c/", 1)[0]
    for key in [*RECORDS, "c/0/0/0/0/0/1/2/3/4", f"{array}/c/0/0/0/0/1/2/3/4", f"{array}/c/0/0/0/0/0/x/2/3/4"]:
        assert not is_cacheable(key), key


@pytest.mark.parametrize("key", RECORDS)
async def test_a_record_changed_or_deleted_at_the_source_is_seen_at_once(tmp_path: Path, key: str) -> None:
    tiers, cache = await _tiers(tmp_path)
    await tiers.put(key, b"first")
    assert await tiers.get(key) == b"first"
    await tiers.source.put(key, b"second")  # another writer, repair or GC acts at the source
    assert await tiers.get(key) == b"second"
    await tiers.source.delete([key])
    with pytest.raises(ObjectNotFoundError):
        await tiers.get(key)
    stats = tiers.tier_stats
    assert (stats.memory_hits, stats.disk_hits, stats.source_reads) == (0, 0, 2)
    assert _files(cache) == {}


# ---------------------------------------------------------------------- the disk tier's budget (defect 3)


def _key(name: str) -> str:
    return data_path(MID, name.encode().ljust(32, b"."), CHUNK)


async def test_disk_tier_evicts_the_least_recently_used_copies_to_stay_within_its_budget(tmp_path: Path) -> None:
    tier = await DiskTier.open(tmp_path, "source", 300)
    for name in "abc":
        await tier.put(_key(name), [memoryview(name.encode() * 100)])
    assert await tier.get(_key("a")) == b"a" * 100  # a is now more recent than b and c
    await tier.put(_key("d"), [memoryview(b"d" * 100)])
    assert sorted(_files(tier.root)) == sorted(_key(n) for n in "acd")
    assert await tier.get(_key("b")) is None
    await tier.put(_key("e"), [memoryview(b"e" * 150)])  # needs the room of two: c, then a
    assert sorted(_files(tier.root)) == sorted(_key(n) for n in "de")
    assert (tier.used, tier.evictions) == (250, 3)
    await tier.put(_key("huge"), [memoryview(b"h" * 301)])  # larger than the budget: never cached
    assert sorted(_files(tier.root)) == sorted(_key(n) for n in "de")
    assert sum(len(v) for v in _files(tier.root).values()) == tier.used <= 300
    assert not (tier.root / _key("b")).parent.exists()  # an evicted chunk leaves no empty directory


async def test_an_eviction_unlinked_late_never_deletes_a_copy_written_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CI saw the index count a copy that was gone: an eviction's unlink, run late by a busy thread pool,
    # deleted the copy a load had written again since. Here the unlink is held until the rewrite was issued.
    tier = await DiskTier.open(tmp_path, "source", 100)
    await tier.put(_key("a"), [memoryview(b"a" * 100)])
    gate, unlinking = threading.Event(), threading.Event()
    unlink = tier._unlink

    def held_unlink(keys: Any, prune: bool = True) -> None:
        unlinking.set()
        assert gate.wait(10)
        unlink(keys, prune)

    monkeypatch.setattr(tier, "_unlink", held_unlink)
    evicting = asyncio.ensure_future(tier.put(_key("b"), [memoryview(b"b" * 100)]))  # evicts a
    assert await asyncio.to_thread(unlinking.wait, 10)
    rewrite = asyncio.ensure_future(tier.put(_key("a"), [memoryview(b"A" * 100)]))  # a load fills it again
    await asyncio.sleep(0.2)  # without the ordering, the rewrite lands now and the unlink deletes it next
    gate.set()
    await asyncio.gather(evicting, rewrite)
    assert _files(tier.root) == {_key("a"): b"A" * 100}  # b went to make room for the newer a
    assert tier.used == 100
    assert await tier.get(_key("a")) == b"A" * 100


async def test_disk_tier_recency_survives_a_restart(tmp_path: Path) -> None:
    tier = await DiskTier.open(tmp_path, "source", 300)
    for name in "abc":
        await tier.put(_key(name), [memoryview(name.encode() * 100)])
        await asyncio.sleep(0.02)  # file times are as coarse as the kernel's clock tick
    assert await tier.get(_key("a")) is not None  # touched: the most recent now

    again = await DiskTier.open(tmp_path, "source", 300)  # a new process: the index comes from the files
    assert again.used == 300
    await asyncio.sleep(0.02)
    await again.put(_key("d"), [memoryview(b"d" * 100)])
    assert sorted(_files(tier.root)) == sorted(_key(n) for n in "acd")

    smaller = await DiskTier.open(tmp_path, "source", 200)  # a smaller budget evicts the oldest at open
    assert (smaller.used, smaller.evictions) == (200, 1)
    assert sorted(_files(tier.root)) == sorted(_key(n) for n in "ad")


async def test_disk_tier_clears_temporary_files_of_crashed_writers_only(tmp_path: Path) -> None:
    tier = await DiskTier.open(tmp_path, "source", 300)
    await tier.put(_key("a"), [memoryview(b"a" * 10)])
    stale, fresh = tier.root / "x.tmp-old", tier.root / "y.tmp-new"
    stale.write_bytes(b"s")
    fresh.write_bytes(b"f")  # a live writer in another process
    os.utime(stale, (0, 0))
    again = await DiskTier.open(tmp_path, "source", 300)
    assert again.used == 10
    assert not stale.exists()
    assert fresh.exists()


# ---------------------------------------------------------------------- one cache directory, many stores


def test_source_identity_tells_endpoints_apart() -> None:
    url = "s3://bucket/kv"
    aws = source_identity(url, {})
    minio = source_identity(url, {"endpoint_url": "http://127.0.0.1:9000"})
    assert len({aws, minio, source_identity(url, {"client_kwargs": {"endpoint_url": "http://h:1"}})}) == 3
    assert minio == source_identity(url, {"endpoint_url": "http://127.0.0.1:9000", "key": "k"})


async def test_two_sources_sharing_a_cache_directory_never_see_each_others_copies(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    one = LocalObjectStore(tmp_path / "one")
    two = LocalObjectStore(tmp_path / "two")
    tiers_one = TieredObjectStore(one, cacheable=is_cacheable, disk=await DiskTier.open(cache, one.url, 1 << 20))
    tiers_two = TieredObjectStore(two, cacheable=is_cacheable, disk=await DiskTier.open(cache, two.url, 1 << 20))
    await tiers_one.put(DATA_KEY, b"one's bytes")
    await two.put(DATA_KEY, b"two's bytes")  # the same key, other contents
    assert await tiers_two.get(DATA_KEY) == b"two's bytes"
    assert await tiers_one.get(DATA_KEY) == b"one's bytes"
    assert (tiers_two.tier_stats.disk_hits, tiers_one.tier_stats.disk_hits) == (0, 1)


@pytest.mark.parametrize("backend", ["local", "moto", "rgw"], indirect=True)
async def test_stores_sharing_a_cache_url_each_load_their_own_kv(
    store_url: Any,
    tmp_path: Path,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
) -> None:
    url, options = store_url
    cache = str(tmp_path / "nvme")
    spec = make_spec()
    tokens = list(range(32))  # the same prompt, so the same chunk keys, but other KV in each store
    stores = [(url, options, make_kv(spec, 32, seed=1)), (str(tmp_path / "other"), None, make_kv(spec, 32, seed=2))]
    for where, opts, kv in stores:
        async with kvstore.open(where, storage_options=opts, chunk_tokens=CHUNK, cache_url=cache) as store:
            await store.save_prefix(spec, tokens, kv)
    for where, opts, kv in stores:
        async with kvstore.open(where, storage_options=opts, cache_url=cache) as store:
            hit = await store.load_prefix(spec, tokens)
            stats = store.stats()
        assert hit.num_tokens == 32
        assert_kv_equal(hit.kv, kv)
        assert (stats.chunks_damaged, stats.cache_rereads) == (0, 0)
        assert stats.disk_hits > 0


# ---------------------------------------------------------------------- through kvstore.open


async def test_open_bounds_the_disk_tier_and_reports_its_size_and_evictions(
    tmp_path: Path, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    spec = make_spec()
    kv = make_kv(spec, 64)
    budget = spec.bytes_per_token * 24  # room for the data of one chunk of 16 tokens, not two
    cache = tmp_path / "nvme"
    async with kvstore.open(tmp_path / "kv", chunk_tokens=CHUNK, cache_url=cache, disk_cache_bytes=budget) as store:
        await store.save_prefix(spec, list(range(64)), kv)
        assert_kv_equal((await store.load_prefix(spec, list(range(64)))).kv, kv)
        stats = store.stats()
    on_disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert 0 < stats.disk_used_bytes == on_disk <= budget
    assert stats.disk_evictions > 0
    assert stats.source_reads > 0


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_open_refuses_a_bad_disk_budget_or_a_remote_cache(value: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="disk_cache_bytes"):
        kvstore.open(tmp_path, cache_url=tmp_path / "c", disk_cache_bytes=value)
    with pytest.raises(InvalidInputError, match="cache_url"):
        kvstore.open(tmp_path, cache_url="s3://bucket/cache")


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
    payload = 40 * spec.bytes_per_token
    assert after.memory_bytes - before.memory_bytes >= payload  # every tensor byte came from memory
    assert after.source_bytes - before.source_bytes < payload // 4  # only records went to the source
    assert 0 < after.tier_hit_rate < 1


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
async def test_disk_tier_in_front_of_s3_serves_a_new_process_and_never_a_wrong_tensor(
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
    payload = 48 * spec.bytes_per_token
    assert stats.disk_bytes >= payload  # every tensor byte came from the disk tier
    assert stats.source_bytes < payload // 4  # only records went to S3

    # A damaged cache copy is caught by the checksums: never a wrong tensor.
    data_files = sorted(p for p in cache.rglob("*") if p.is_file() and "/c/0/0/0/0/0/" in p.as_posix())
    assert len(data_files) == 3
    for path in data_files:
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    async with kvstore.open(url, storage_options=options, cache_url=str(cache), repair=False) as store:
        damaged = await store.load_prefix(spec, tokens)
    n = damaged.num_tokens
    assert_kv_equal(damaged.kv, [(k[:n], v[:n]) for k, v in kv])

    async with kvstore.open(url, storage_options=options) as store:  # the source itself is intact
        assert_kv_equal((await store.load_prefix(spec, tokens)).kv, kv)
