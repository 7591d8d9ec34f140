"""Capacity-bounded eviction by recency: real saves and loads, access records, then a GC with a budget.

Recency is made explicit without sleeping: ``kvstore.access.wall_clock`` stamps
each use with a chosen time (days apart), and the GC runs with ``now`` ten days
ahead, so every object's mtime is older than the grace and only the access
records order the prompts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from gc_helpers import run_gc_at, snapshot

import kvstore
import kvstore.access
from kvstore import gc as kvgc
from kvstore.formats.access import ACCESS_DIR, AccessRecord
from kvstore.formats.layout import parse_chunk_object
from kvstore.gc.evict import eviction_order, plan_prefix, subtree_recency

CHUNK = 4
DAY = 86400.0
T0 = time.time()
NOW = T0 + 10 * DAY  # the GC's clock
GRACE = 3600.0
BACKENDS = ["memory", "local", "moto"]


def _prompt(base: int, n: int = 16) -> list[int]:
    return list(range(1000 * base, 1000 * base + n))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """``clock(t)`` sets the time the next uses are recorded at."""
    now = [T0]
    monkeypatch.setattr(kvstore.access, "wall_clock", lambda: now[0])

    def set_to(t: float) -> None:
        now[0] = t

    return set_to


async def _save(url: str, opts: Any, spec: kvstore.ModelSpec, prompts: dict[str, list[int]], kv: Any) -> None:
    async with kvstore.open(url, storage_options=opts, chunk_tokens=CHUNK) as store:
        for tokens in prompts.values():
            await store.save_prefix(spec, tokens, [(k[: len(tokens)], v[: len(tokens)]) for k, v in kv])


async def _use(url: str, opts: Any, spec: kvstore.ModelSpec, tokens: list[int]) -> None:
    async with kvstore.open(url, storage_options=opts) as store:
        assert (await store.load_prefix(spec, tokens)).num_tokens == len(tokens)


async def _hits(url: str, opts: Any, spec: kvstore.ModelSpec, prompts: dict[str, list[int]]) -> dict[str, int]:
    async with kvstore.open(url, storage_options=opts, record_access=False) as store:
        return {name: (await store.lookup(spec, tokens)) for name, tokens in prompts.items()}


def _chunk_bytes(before: dict[str, bytes]) -> int:
    return sum(len(v) for k, v in before.items() if k.startswith("chunks/"))


def _data_bytes(before: dict[str, bytes]) -> int:
    """Bytes of the data objects alone: what evicting chunks frees (an array's zarr.json stays)."""
    return sum(len(v) for k, v in before.items() if (o := parse_chunk_object(k)) is not None and o.kind == "data")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_over_budget_store_keeps_the_most_recently_used(
    store_url: Any,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
    clock: Callable[[float], None],
) -> None:
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, 16)
    prompts = {"a": _prompt(1), "b": _prompt(2), "c": _prompt(3)}
    await _save(url, opts, spec, prompts, kv)
    for day, name in ((1, "a"), (2, "b"), (3, "c")):  # a is the least recently used
        clock(T0 + day * DAY)
        await _use(url, opts, spec, prompts[name])
    before = await snapshot(url, opts)
    total = _chunk_bytes(before)
    budget = total - _data_bytes(before) // 3  # room for two of the three prompts

    report = await run_gc_at(url, opts, grace=GRACE, now=NOW, max_bytes=budget)

    assert report.ok
    assert report.budget_met is True
    assert report.bytes_before_eviction == total
    assert report.bytes_after is not None
    assert report.bytes_after <= budget
    assert _chunk_bytes(await snapshot(url, opts)) == report.bytes_after
    assert report.evicted_chunks == 4
    assert report.reasons["evicted"] == 4  # one object a chunk
    assert await _hits(url, opts, spec, prompts) == {"a": 0, "b": 16, "c": 16}
    # The access records were compacted to one per live model, holding only chunks still there.
    records = await snapshot(url, opts, ACCESS_DIR + "/")
    assert len(records) == 1
    [rec] = [AccessRecord.from_msgpack(v) for v in records.values()]
    assert (len(rec.keys), rec.last) == (8, math.ceil(T0 + 3 * DAY))
    async with kvstore.open(url, storage_options=opts) as store:
        hit = await store.load_prefix(spec, prompts["c"])
    assert hit.num_tokens == 16
    assert_kv_equal(hit.kv, kv)


@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_shared_prefix_of_a_recent_prompt_survives_while_the_old_branch_goes(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], clock: Callable[[float], None]
) -> None:
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, 16)
    shared = _prompt(7, 8)
    prompts = {"old": shared + _prompt(8, 8), "recent": shared + _prompt(9, 8)}
    await _save(url, opts, spec, prompts, kv)
    clock(T0 + 1 * DAY)
    await _use(url, opts, spec, prompts["old"])  # also a use of the shared chunks, but older
    clock(T0 + 3 * DAY)
    await _use(url, opts, spec, prompts["recent"])
    before = await snapshot(url, opts)
    total = _chunk_bytes(before)
    per_chunk = _data_bytes(before) // 6  # 2 shared + 2 + 2 chunks, all of one size

    report = await run_gc_at(url, opts, grace=GRACE, now=NOW, max_bytes=total - 2 * per_chunk)

    assert report.evicted_chunks == 2
    assert await _hits(url, opts, spec, prompts) == {"old": 8, "recent": 16}


@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_nothing_used_within_the_grace_is_evicted(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], clock: Callable[[float], None]
) -> None:
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, 16)
    prompts = {"a": _prompt(1), "b": _prompt(2)}
    await _save(url, opts, spec, prompts, kv)
    clock(T0 + DAY)
    await _use(url, opts, spec, prompts["b"])
    clock(NOW - 60)  # a load just before the GC: its whole chain is protected
    async with kvstore.open(url, storage_options=opts) as store:
        assert (await store.lookup(spec, prompts["a"][:12])) == 12  # a lookup hit counts as a use

    report = await run_gc_at(url, opts, grace=GRACE, now=NOW, max_bytes=0)

    assert report.budget_met is False
    assert report.budget_note is not None
    assert "grace" in report.budget_note
    assert report.bytes_after is not None
    assert report.bytes_after > 0
    hits = await _hits(url, opts, spec, prompts)
    assert hits == {"a": 12, "b": 0}  # a's last chunk was not used: evicted; the 3 chunks it extends stay


@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_max_idle_and_dry_run(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], clock: Callable[[float], None]
) -> None:
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, 16)
    prompts = {"a": _prompt(1), "b": _prompt(2), "c": _prompt(3)}
    await _save(url, opts, spec, prompts, kv)
    for day, name in ((1, "a"), (2, "b"), (6, "c")):
        clock(T0 + day * DAY)
        await _use(url, opts, spec, prompts[name])
    before = await snapshot(url, opts, "chunks/")

    plan = await run_gc_at(url, opts, grace=GRACE, now=NOW, max_idle=5 * DAY, dry_run=True)
    assert plan.evicted_chunks == 8
    assert plan.budget_met is None
    assert await snapshot(url, opts, "chunks/") == before  # a dry run deletes nothing

    report = await run_gc_at(url, opts, grace=GRACE, now=NOW, max_idle=5 * DAY)
    assert report.evicted_chunks == 8
    assert await _hits(url, opts, spec, prompts) == {"a": 0, "b": 0, "c": 16}


@pytest.mark.parametrize("backend", ["memory", "local"])
async def test_access_records_of_a_retired_model_are_garbage(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], clock: Callable[[float], None]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _save(url, opts, spec, {"a": _prompt(1)}, make_kv(spec, 16))
    async with kvstore.open(url, storage_options=opts) as store:
        await store.retire(spec.name, spec.version)
    assert await snapshot(url, opts, ACCESS_DIR + "/")
    report = await run_gc_at(url, opts, grace=GRACE, now=NOW)
    assert report.access_records_garbage == 1
    assert await snapshot(url, opts, ACCESS_DIR + "/") == {}


@pytest.mark.parametrize("backend", ["local"])
async def test_a_load_racing_an_eviction_is_a_shorter_hit(
    store_url: Any,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
    clock: Callable[[float], None],
) -> None:
    """The GC evicts every chunk between the load's HEAD round and its reads: a miss, never an error."""
    from kvstore.storage import open_object_store

    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, 16)
    tokens = _prompt(1)
    await _save(url, opts, spec, {"a": tokens}, kv)

    inner = await open_object_store(url, opts)
    gated = _EvictAfterHeads(inner, lambda: run_gc_at(url, opts, grace=GRACE, now=NOW, max_bytes=0))
    store = kvstore.KVStore(gated, kvstore.StoreOptions(chunk_tokens=CHUNK, record_access=False))
    try:
        hit = await store.load_prefix(spec, tokens)
    finally:
        await store.close()
    assert gated.fired
    assert hit.num_tokens < len(tokens)
    if hit.num_tokens:
        assert_kv_equal(hit.kv, [(k[: hit.num_tokens], v[: hit.num_tokens]) for k, v in kv])
    assert await _hits(url, opts, spec, {"a": tokens}) == {"a": 0}


class _EvictAfterHeads(kvstore.storage.ObjectStore):
    """Passes everything through; the first read after the HEAD round first runs ``hook`` (a GC)."""

    def __init__(self, inner: kvstore.storage.ObjectStore, hook: Callable[[], Any]) -> None:
        self.inner, self.hook, self.fired = inner, hook, False
        self.batches_heads = inner.batches_heads

    @property
    def url(self) -> str:
        return self.inner.url

    async def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            await self.hook()

    async def get(self, key: str) -> bytes:
        if key.startswith("chunks/"):
            await self._fire()
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        await self._fire()
        return await self.inner.get_range(key, start, end)

    async def get_range_into(self, key: str, start: int, buffers: Any, *, then: Any = None) -> int:
        await self._fire()
        return await self.inner.get_range_into(key, start, buffers, then=then)

    async def get_planned(self, key: str, head: int, plan: Any, *, then: Any = None) -> tuple[bytes, int]:
        await self._fire()
        return await self.inner.get_planned(key, head, plan, then=then)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        return await self.inner.put(key, data, create_only=create_only)

    async def head(self, key: str) -> Any:
        return await self.inner.head(key)

    async def head_many(self, keys: Any) -> Any:
        return await self.inner.head_many(keys)

    def list(self, prefix: str) -> Any:
        return self.inner.list(prefix)

    async def delete(self, keys: Any) -> None:
        await self.inner.delete(keys)

    async def close(self) -> None:
        await self.inner.close()


# ---------------------------------------------------------------------- the pure order


def test_subtree_recency_and_order_put_children_first() -> None:
    # Chain 1 -> 2 -> 3 and a branch 1 -> 4; chunk 3 used last.
    keys = np.array([1, 2, 3, 4], np.uint64)
    parents = np.array([99, 1, 2, 1], np.uint64)
    index = np.array([0, 1, 2, 1])
    last = np.array([10.0, 5.0, 50.0, 20.0])
    rec = subtree_recency(keys, parents, index, last)
    assert rec.tolist() == [50.0, 50.0, 50.0, 20.0]
    sizes = np.ones(4, np.int64)
    cands = eviction_order([keys], [parents], [index], [sizes], [last])
    assert cands.keys[cands.order].tolist() == [4, 3, 2, 1]
    assert plan_prefix(cands, 4, max_bytes=2, idle_before=None, protect_from=100.0) == (2, True)
    assert plan_prefix(cands, 4, max_bytes=0, idle_before=None, protect_from=30.0) == (1, False)
    assert plan_prefix(cands, 4, max_bytes=None, idle_before=30.0, protect_from=100.0) == (1, True)


@pytest.mark.parametrize("backend", ["local"])
async def test_a_run_that_evicts_takes_no_checkpoint(store_url: Any, tmp_path: Any) -> None:
    url, opts = store_url
    async with kvstore.open(url, storage_options=opts):
        pass
    with pytest.raises(kvstore.InvalidInputError, match="checkpoint"):
        await kvgc.run_gc(url, storage_options=opts, max_bytes=1, checkpoint=tmp_path / "run.ckpt")
    assert not (tmp_path / "run.ckpt").exists()
