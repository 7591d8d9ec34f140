"""Mark and sweep on every backend: what is garbage goes, what a live model can reach stays bit-exact."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gc_helpers import put_raw, run_gc_at, snapshot

import kvstore
import kvstore.gc
from kvstore.formats.keys import chunk_keys, key_root, model_id, normalize_tokens
from kvstore.formats.layout import data_path, metadata_path, model_chunks_prefix, tail_marker_path

CHUNK = 4
PROMPT = list(range(100, 118))  # 4 full chunks + a 2-token tail


async def _save(url: str, options: Any, spec: kvstore.ModelSpec, tokens: list[int], kv: Any) -> None:
    async with kvstore.open(url, storage_options=options, chunk_tokens=CHUNK) as store:
        await store.save_prefix(spec, tokens, kv)


async def _load(url: str, options: Any, spec: kvstore.ModelSpec, tokens: list[int]) -> kvstore.LoadResult:
    async with kvstore.open(url, storage_options=options, create=False) as store:
        return await store.load_prefix(spec, tokens)


async def test_retire_then_gc_removes_exactly_the_retired_version(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    url, opts = store_url
    old, new = make_spec(version="v1"), make_spec(version="v2")
    kv = make_kv(old, len(PROMPT))
    await _save(url, opts, old, PROMPT, kv)
    await _save(url, opts, new, PROMPT, kv)
    await _save(url, opts, new, PROMPT[:9], [(k[:9], v[:9]) for k, v in kv])
    before = await snapshot(url, opts)
    async with kvstore.open(url, storage_options=opts) as store:
        [info] = await store.retire("tiny", "v1", by="ops@test", reason="new weights")
        assert (info.status, info.retired_by, info.reason) == ("retired", "ops@test", "new weights")
        statuses = {m.spec.version: m.status for m in await store.models()}
        assert statuses == {"v1": "retired", "v2": "live"}

    report = await run_gc_at(url, opts)
    after = await snapshot(url, opts)
    old_prefix = model_chunks_prefix(model_id(old))
    expected = {k: v for k, v in before.items() if not k.startswith(old_prefix)}
    assert set(after) - set(expected) == {f"models/{model_id(old).hex()}.retired.msgpack"}
    for key, data in expected.items():
        assert after[key] == data, key
    assert report.ok
    assert report.reasons == {"retired": len(before) - len(expected)}
    by_label = {m.label: m for m in report.by_model.values()}
    assert by_label["tiny@v1"].freed_objects == len(before) - len(expected)
    assert by_label["tiny@v1"].kept_objects == 0
    assert by_label["tiny@v2"].freed_objects == 0

    hit = await _load(url, opts, new, PROMPT)
    assert hit.num_tokens == len(PROMPT)
    assert_kv_equal(hit.kv, kv)
    hit9 = await _load(url, opts, new, PROMPT[:9])
    assert hit9.num_tokens == 9
    assert (await _load(url, opts, old, PROMPT)).num_tokens == 0

    again = await run_gc_at(url, opts)
    assert again.freed_objects == 0
    assert again.ok
    assert await snapshot(url, opts) == after


async def test_save_under_retired_version_is_refused(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec(version="v1")
    kv = make_kv(spec, 8)
    await _save(url, opts, spec, PROMPT[:8], kv)
    async with kvstore.open(url, storage_options=opts) as writer, kvstore.open(url, storage_options=opts) as ops:
        await writer.save_prefix(spec, PROMPT[:8], kv)  # caches "live"
        first = await ops.retire("tiny", "v1")
        again = await ops.retire("tiny", "v1", by="someone-else")
        assert again == first  # the first retirement stands
        with pytest.raises(kvstore.ModelRetiredError, match="tiny@v1"):
            await ops.save_prefix(spec, PROMPT[:8], kv)
        with pytest.raises(kvstore.InvalidInputError, match="no model tiny@v9"):
            await ops.retire("tiny", "v9")
        # Another open store trusts its check for LIVE_CHECK_TTL; a fresh one refuses at once.
        writer._live_checked.clear()
        with pytest.raises(kvstore.ModelRetiredError):
            await writer.save_prefix(spec, PROMPT[:8], kv)


async def test_a_refused_save_under_a_retired_version_writes_nothing(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    """The retirement check goes out with the chain's HEADs; nothing is written before both answered."""
    url, opts = store_url
    spec = make_spec(version="v1")
    kv = make_kv(spec, len(PROMPT))
    await _save(url, opts, spec, PROMPT[:8], [(k[:8], v[:8]) for k, v in kv])
    async with kvstore.open(url, storage_options=opts) as store:
        await store.retire("tiny", "v1")
    before = await snapshot(url, opts)
    async with kvstore.open(url, storage_options=opts, chunk_tokens=CHUNK) as fresh:  # new chunks, a new tail
        with pytest.raises(kvstore.ModelRetiredError):
            await fresh.save_prefix(spec, PROMPT, kv)
    assert await snapshot(url, opts) == before


async def test_dry_run_deletes_nothing_and_predicts_the_real_run(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec(version="v1")
    await _save(url, opts, spec, PROMPT, make_kv(spec, len(PROMPT)))
    async with kvstore.open(url, storage_options=opts) as store:
        await store.retire("tiny", "v1")
    before = await snapshot(url, opts)
    now = time.time() + 5
    plan = await run_gc_at(url, opts, dry_run=True, now=now)
    assert await snapshot(url, opts) == before
    assert plan.dry_run
    assert plan.freed_objects > 0
    done = await run_gc_at(url, opts, now=now)
    assert (done.freed_objects, done.freed_bytes) == (plan.freed_objects, plan.freed_bytes)


def _age_all_but(root: Path, young: str, tmp_key: str) -> Path:
    """Make every file two hours old except those under ``young``; add an old temporary file."""
    tmp = root / tmp_key
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"partial")
    old_time = time.time() - 7200
    for path in root.rglob("*"):
        if path.is_file() and not path.relative_to(root).as_posix().startswith(young):
            os.utime(path, (old_time, old_time))
    return tmp


@pytest.mark.parametrize("backend", ["local"])
async def test_orphans_older_than_grace_go_younger_stay_local(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _save(url, opts, spec, PROMPT, make_kv(spec, len(PROMPT)))
    mid = model_id(spec)
    damaged = data_path(mid, b"\x11" * 32, CHUNK)  # no valid header: damage
    young = data_path(mid, b"\x22" * 32, CHUNK)
    empty_array = metadata_path(mid, 3)  # an array of a live model without chunks: kept
    unknown = metadata_path(b"\x99" * 16, CHUNK)  # a model id with no record
    garbage = {damaged: b"x" * 64, young: b"y" * 64, empty_array: b"{}", unknown: b"{}"}
    await put_raw(url, opts, garbage)
    tmp = _age_all_but(Path(url), young, data_path(mid, b"\x44" * 32, CHUNK) + ".tmp-" + "ab" * 16)

    report = await run_gc_at(url, opts, grace=3600, now=time.time())
    left = await snapshot(url, opts)
    assert damaged not in left
    assert unknown not in left
    assert young in left
    assert empty_array in left
    assert not await asyncio.to_thread(tmp.exists)
    assert report.reasons == {"damaged": 1, "unknown-model": 1, "temp": 1}
    assert sum(m.young_objects for m in report.by_model.values()) == 1
    assert (await _load(url, opts, spec, PROMPT)).num_tokens == len(PROMPT)


@pytest.mark.parametrize("backend", ["moto", "rgw"])
async def test_orphans_older_than_grace_go_younger_stay_s3(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _save(url, opts, spec, PROMPT, make_kv(spec, len(PROMPT)))
    mid = model_id(spec)
    old, young = data_path(mid, b"\x11" * 32, CHUNK), data_path(mid, b"\x22" * 32, CHUNK)
    await put_raw(url, opts, {old: b"x"})
    await asyncio.sleep(2.2)
    await put_raw(url, opts, {young: b"y"})
    report = await run_gc_at(url, opts, grace=1.5, now=time.time())
    left = await snapshot(url, opts)
    assert old not in left
    assert young in left
    assert report.reasons == {"damaged": 1}
    assert (await _load(url, opts, spec, PROMPT)).num_tokens == len(PROMPT)


@pytest.mark.parametrize("backend", ["local", "moto", "rgw"])
async def test_broken_chain_is_collected_and_a_new_save_restores_it(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, len(PROMPT))
    await _save(url, opts, spec, PROMPT, kv)
    mid = model_id(spec)
    keys = chunk_keys(spec, normalize_tokens(PROMPT), CHUNK)
    backend = await kvstore.storage.open_object_store(url, opts)
    await backend.delete([data_path(mid, keys[1].digest, CHUNK)])  # chunk 1 lost
    await backend.close()

    report = await run_gc_at(url, opts)
    left = await snapshot(url, opts, model_chunks_prefix(mid))
    arrays = {metadata_path(mid, CHUNK), metadata_path(mid, 2)}  # kept while the model is live
    assert set(left) == {data_path(mid, keys[0].digest, CHUNK)} | arrays  # only chunk 0 survives
    assert report.reasons == {"unreachable": 3, "stale-tail": 1}  # chunks 2, 3 and the tail; its marker
    assert (await _load(url, opts, spec, PROMPT)).num_tokens == CHUNK

    await _save(url, opts, spec, PROMPT, kv)
    hit = await _load(url, opts, spec, PROMPT)
    assert hit.num_tokens == len(PROMPT)
    assert_kv_equal(hit.kv, kv)


@pytest.mark.parametrize("backend", ["local", "memory"])
async def test_a_data_object_is_reachable_only_where_its_header_says_it_belongs(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    """The path holds part of the key: a copy of a chunk in another chunk's place or in another length's array
    is damage, and so is a chunk of another codec than the store's (its children become unreachable)."""
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, len(PROMPT))
    await _save(url, opts, spec, PROMPT, kv)
    mid = model_id(spec)
    keys = chunk_keys(spec, normalize_tokens(PROMPT), CHUNK)
    other_url = url + "-lz4"
    async with kvstore.open(other_url, storage_options=opts, chunk_tokens=CHUNK, codec="lz4") as store:
        await store.save_prefix(spec, PROMPT, kv)
    source = await snapshot(other_url, opts, model_chunks_prefix(mid))
    chunk0 = (await snapshot(url, opts, model_chunks_prefix(mid)))[data_path(mid, keys[0].digest, CHUNK)]
    misplaced = {
        data_path(mid, b"\x33" * 32, CHUNK): chunk0,  # another chunk's place
        data_path(mid, keys[0].digest, 3): chunk0,  # its place in the array of 3-token chunks
        data_path(mid, keys[2].digest, CHUNK): source[data_path(mid, keys[2].digest, CHUNK)],  # lz4 in a "none" store
    }
    await put_raw(url, opts, misplaced)

    report = await run_gc_at(url, opts)
    left = await snapshot(url, opts, model_chunks_prefix(mid))
    assert not set(misplaced) & set(left)
    assert data_path(mid, keys[0].digest, CHUNK) in left
    assert data_path(mid, keys[1].digest, CHUNK) in left
    assert report.reasons == {"damaged": 3, "unreachable": 2, "stale-tail": 1}  # chunk 3 and the tail
    assert mid.hex() not in report.protected_models
    assert (await _load(url, opts, spec, PROMPT)).num_tokens == 2 * CHUNK


@pytest.mark.parametrize("backend", ["local"])
async def test_chunks_after_a_gap_are_rewritten_not_skipped(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    # The writer's half of the grace rule: a chunk behind a gap is refreshed, so a GC treats it as young.
    url, opts = store_url
    spec = make_spec()
    kv = make_kv(spec, len(PROMPT))
    await _save(url, opts, spec, PROMPT, kv)
    keys = chunk_keys(spec, normalize_tokens(PROMPT), CHUNK)
    await asyncio.to_thread(Path(url, data_path(model_id(spec), keys[2].digest, CHUNK)).unlink)
    async with kvstore.open(url, storage_options=opts) as store:
        res = await store.save_prefix(spec, PROMPT, kv)
    assert (res.chunks_skipped, res.chunks_written) == (2, 3)


@pytest.mark.parametrize("backend", ["local", "memory"])
async def test_tail_markers_follow_their_chunks(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _save(url, opts, spec, PROMPT[:2], make_kv(spec, 2))  # a tail chained on the root: marker under root
    mid = model_id(spec)
    marker = tail_marker_path(mid, key_root(spec, CHUNK), 2)
    stale = tail_marker_path(mid, key_root(spec, CHUNK), 3)  # names a 3-token tail that does not exist
    await put_raw(url, opts, {stale: b"\x00" * 32})
    report = await run_gc_at(url, opts)
    left = await snapshot(url, opts)
    assert marker in left
    assert stale not in left
    assert report.reasons == {"stale-tail": 1}
    async with kvstore.open(url, storage_options=opts) as store:
        assert await store.lookup(spec, [*PROMPT[:2], 7, 8, 9]) == 2


@pytest.mark.parametrize("backend", ["local"])
async def test_unreadable_model_record_protects_its_chunks(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    await _save(url, opts, spec, PROMPT, make_kv(spec, len(PROMPT)))
    mid = model_id(spec)
    newer = b"\x81\xa6format\x63"  # a record in format version 99
    await asyncio.to_thread(Path(url, f"models/{mid.hex()}.msgpack").write_bytes, newer)
    before = await snapshot(url, opts, "chunks/")
    report = await run_gc_at(url, opts)
    assert await snapshot(url, opts, "chunks/") == before
    assert mid.hex() in report.protected_models


class _Crash(RuntimeError):
    """Stands for a crash or Ctrl-C in the middle of a sweep."""


class _FailingBulk:
    """Bulk operations that refuse some keys, or stop the run after the first batch."""

    def __init__(self, inner: Any, *, refuse: str = "", interrupt: bool = False) -> None:
        self.inner, self.refuse, self.interrupt, self.batches = inner, refuse, interrupt, 0
        self.fan_out, self.split_min = inner.fan_out, inner.split_min

    def list_objects(self, prefix: str) -> Any:
        return self.inner.list_objects(prefix)

    async def list_level(self, prefix: str) -> Any:
        return await self.inner.list_level(prefix)

    async def delete_objects(self, keys: Any) -> Any:
        from kvstore.storage.s3_batch import DeleteFailure

        self.batches += 1
        if self.interrupt and self.batches > 1:
            raise _Crash
        ok = [k for k in keys if self.refuse not in k or not self.refuse]
        failures = await self.inner.delete_objects(ok)
        return failures + [DeleteFailure(k, "AccessDenied: test") for k in keys if k not in ok]


@pytest.mark.parametrize("backend", ["local"])
async def test_delete_failures_are_reported_and_an_interrupted_gc_is_finished_by_the_next(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    from kvstore.gc import mark_and_sweep
    from kvstore.gc.bulk import StoreBulkOps
    from kvstore.storage import open_object_store

    url, opts = store_url
    specs = [make_spec(version=f"v{i}") for i in range(3)]
    long_prompt = list(range(4 * 600))  # one object a chunk: over one DeleteObjects batch of 1000 to collect
    for spec in specs:
        await _save(url, opts, spec, long_prompt, make_kv(spec, len(long_prompt)))
    async with kvstore.open(url, storage_options=opts) as store:
        await store.retire("tiny", "v0")
        await store.retire("tiny", "v1")
    backend = await open_object_store(url, opts)
    now = time.time() + 5
    with pytest.raises(_Crash):
        await mark_and_sweep(
            backend, _FailingBulk(StoreBulkOps(backend), interrupt=True), grace=0, now=now, allow_short_grace=True
        )
    retired = [model_chunks_prefix(model_id(spec)) for spec in specs[:2]]
    assert [m for prefix in retired async for m in backend.list(prefix)] != []

    report = await mark_and_sweep(
        backend, _FailingBulk(StoreBulkOps(backend), refuse="/c/0/"), grace=0, now=now, allow_short_grace=True
    )
    assert not report.ok
    assert report.failures_total > 0
    assert len(report.failures) == min(100, report.failures_total)
    assert all("/c/0/" in f.key and f.error == "AccessDenied: test" for f in report.failures)  # data objects
    assert report.freed_objects + report.failures_total == sum(report.reasons.values())

    finish = await mark_and_sweep(backend, StoreBulkOps(backend), grace=0, now=now, allow_short_grace=True)
    assert finish.ok
    assert finish.freed_objects > 0
    assert [m for prefix in retired async for m in backend.list(prefix)] == []
    assert (await _load(url, opts, specs[2], long_prompt)).num_tokens == len(long_prompt)
    await backend.close()


@pytest.mark.parametrize("grace", [0, 30, 60])
async def test_a_grace_within_the_retirement_check_interval_is_refused(tmp_path: Path, grace: float) -> None:
    """A writer trusts a live check for 60 s: a shorter grace could delete what it still saves."""
    url = str(tmp_path / "kv")
    spec = kvstore.ModelSpec("g", "v1", 2, 2, 8, torch.float16)
    kv = [(torch.zeros(len(PROMPT), 2, 8, dtype=torch.float16),) * 2] * 2
    await _save(url, None, spec, PROMPT, kv)
    async with kvstore.open(url) as store:
        await store.retire("g", "v1")
    before = await snapshot(url, None)
    far_ahead = time.time() + 7200  # every object is garbage older than any grace tried here
    for run in (
        kvstore.gc.run_gc(url, grace=grace),
        run_gc_at(url, None, grace=grace, now=far_ahead, allow_short_grace=False),
    ):
        with pytest.raises(kvstore.InvalidInputError, match="allow_short_grace=True"):
            await run
    assert await snapshot(url, None) == before  # refused before anything was deleted
    allowed = await run_gc_at(url, None, grace=grace, now=far_ahead, allow_short_grace=True)
    assert allowed.freed_objects > 0
    assert (await run_gc_at(url, None, grace=61, now=far_ahead, allow_short_grace=False)).ok
