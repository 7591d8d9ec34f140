"""An interrupted GC resumes from its checkpoint: same end state and counts as one uninterrupted run,
no chunk header read twice, and a checkpoint it cannot trust is refused."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gc_helpers import put_raw, snapshot

import kvstore
import kvstore.gc.marksweep as marksweep
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.gc import GCReport, mark_and_sweep
from kvstore.gc.bulk import BulkOps, open_bulk_ops
from kvstore.gc.checkpoint import Checkpoint, _frame
from kvstore.storage import open_object_store

CHUNK = 4
PROMPT = list(range(4 * 150 + 2))  # 150 chunks and a tail: spread over most of the 256 key prefixes <k0>/


class _Crash(RuntimeError):
    """Stands for Ctrl-C, SIGTERM or a crash in the middle of a run."""


class _Interrupting:
    """Bulk operations that crash at the (k+1)-th delete batch or partition listing, one delete at a time.

    Deletes are serialized so that none is in flight when the crash comes (an
    interrupted request may have deleted objects nobody counted).
    """

    def __init__(self, inner: BulkOps, *, deletes: int | None = None, listings: int | None = None) -> None:
        self.inner, self.deletes, self.listings = inner, deletes, listings
        self.fan_out, self.split_min = inner.fan_out, inner.split_min
        self.delete_calls = self.list_calls = 0
        self._lock = asyncio.Lock()

    async def list_objects(self, prefix: str) -> Any:
        self.list_calls += 1
        if self.listings is not None and self.list_calls > self.listings:
            raise _Crash
        async for meta in self.inner.list_objects(prefix):
            yield meta

    async def list_level(self, prefix: str) -> Any:
        return await self.inner.list_level(prefix)

    async def delete_objects(self, keys: Any) -> Any:
        async with self._lock:
            self.delete_calls += 1
            if self.deletes is not None and self.delete_calls > self.deletes:
                raise _Crash
            return await self.inner.delete_objects(keys)


async def _make_store(url: str, make_spec: Callable[..., Any], make_kv: Callable[..., Any]) -> None:
    """A retired version, a live one with a broken chain, a damaged data object."""
    old, new = make_spec(version="v1"), make_spec(version="v2")
    for spec in (old, new):
        async with kvstore.open(url, chunk_tokens=CHUNK) as store:
            await store.save_prefix(spec, PROMPT, make_kv(spec, len(PROMPT)))
            await store.save_prefix(spec, PROMPT[:40], make_kv(spec, 40))
    async with kvstore.open(url) as store:
        await store.retire("tiny", "v1")
    keys = chunk_keys(new, normalize_tokens(PROMPT), CHUNK)
    backend = await open_object_store(url)
    await backend.delete([data_path(model_id(new), keys[120].digest, CHUNK)])  # chunks 121.. unreachable
    await backend.close()
    await put_raw(url, None, {data_path(model_id(new), b"\x5a" * 32, CHUNK): b"{}"})


async def _gc(url: str, now: float, *, wrap: Callable[[BulkOps], BulkOps] = lambda b: b, **kw: Any) -> GCReport:
    backend = await open_object_store(url)
    try:
        async with open_bulk_ops(backend, url, split_min=0) as bulk:  # a partition per key prefix
            return await mark_and_sweep(backend, wrap(bulk), grace=0, now=now, allow_short_grace=True, **kw)
    finally:
        await backend.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys of the chunk headers the GC reads, in order."""
    seen: list[str] = []
    original = marksweep.read_head

    async def recording(store: Any, path: str, num_layers: int, size: int) -> Any:
        seen.append(path)
        return await original(store, path, num_layers, size)

    monkeypatch.setattr(marksweep, "read_head", recording)
    return seen


@pytest.fixture
def twin_stores(tmp_path: Path, make_spec: Callable[..., Any], make_kv: Callable[..., Any]) -> tuple[str, str]:
    """Two identical stores (same keys, sizes and modification times)."""
    a = str(tmp_path / "a")
    asyncio.run(_make_store(a, make_spec, make_kv))
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    return a, b


async def _uninterrupted(twins: tuple[str, str]) -> tuple[str, str, float, GCReport]:
    """GC the first twin in one run: (its URL, the other's, the clock for both, the report)."""
    now = time.time() + 5
    return twins[0], twins[1], now, await _gc(twins[0], now)


def _same_outcome(resumed: GCReport, whole: GCReport) -> None:
    assert resumed.ok
    assert whole.ok
    assert (resumed.objects_listed, resumed.commits_read) == (whole.objects_listed, whole.commits_read)
    assert resumed.chunks_reachable == whole.chunks_reachable
    assert resumed.reasons == whole.reasons
    assert (resumed.freed_objects, resumed.freed_bytes) == (whole.freed_objects, whole.freed_bytes)
    assert (resumed.kept_objects, resumed.kept_bytes) == (whole.kept_objects, whole.kept_bytes)
    rows = {m.label: m.as_dict() for m in resumed.by_model.values()}
    assert rows == {m.label: m.as_dict() for m in whole.by_model.values()}


async def test_a_run_interrupted_mid_sweep_resumes_without_reading_headers_again(
    twin_stores: tuple[str, str], tmp_path: Path, reads: list[str]
) -> None:
    whole_url, url, now, whole = await _uninterrupted(twin_stores)
    assert whole.reasons["retired"] > 0
    assert whole.reasons["unreachable"] > 0
    assert whole.reasons["damaged"] > 0
    ckpt = tmp_path / "gc.ckpt"
    reads.clear()
    with pytest.raises(_Crash):
        await _gc(url, now, wrap=lambda b: _Interrupting(b, deletes=20), checkpoint=ckpt)
    assert len(reads) == whole.commits_read + 1  # the mark was complete (the damaged header read too)
    assert ckpt.exists()
    partial = await snapshot(url, None)
    assert set(partial) > set(await snapshot(whole_url, None))  # some garbage left: interrupted mid-sweep

    reads.clear()
    resumed = await _gc(url, now, checkpoint=ckpt)
    assert reads == []  # every header came from the checkpoint
    assert resumed.checkpoint.startswith("resumed")
    assert await snapshot(url, None) == await snapshot(whole_url, None)
    _same_outcome(resumed, whole)
    assert not ckpt.exists()  # a finished run forgets its checkpoint


async def test_a_run_interrupted_mid_mark_reads_only_the_partitions_not_done(
    twin_stores: tuple[str, str], tmp_path: Path, reads: list[str]
) -> None:
    whole_url, url, now, whole = await _uninterrupted(twin_stores)
    ckpt = tmp_path / "gc.ckpt"
    reads.clear()
    with pytest.raises(_Crash):
        await _gc(url, now, wrap=lambda b: _Interrupting(b, listings=100), checkpoint=ckpt)
    first = set(reads)
    with ckpt.open("ab") as fh:
        fh.write(b"\x10\x00\x00\x00torn")  # a frame cut short by the crash: ignored
    peek = Checkpoint.open(ckpt, url=f"file://{url}", t0=now, grace=0.0, dry_run=False, now=now)
    done = [p.name for p in peek.marked]
    peek.close()
    assert peek.resumed
    assert 50 < len(done) < 200

    reads.clear()
    resumed = await _gc(url, now, checkpoint=ckpt)
    assert reads
    assert not [k for k in reads if k.startswith(tuple(done))]
    assert first | set(reads) >= {k for k in first if not k.startswith(tuple(done))}
    assert len(set(reads)) < whole.commits_read
    assert await snapshot(url, None) == await snapshot(whole_url, None)
    _same_outcome(resumed, whole)


async def test_a_checkpoint_it_cannot_trust_is_refused(twin_stores: tuple[str, str], tmp_path: Path) -> None:
    whole_url, url = twin_stores
    now = time.time() + 5
    ckpt = tmp_path / "gc.ckpt"

    async def interrupted() -> None:
        with pytest.raises(_Crash):
            await _gc(url, now, wrap=lambda b: _Interrupting(b, deletes=5), checkpoint=ckpt)

    await interrupted()
    other = await _gc(whole_url, now, dry_run=True, checkpoint=ckpt)  # another store: started afresh
    assert "another store" in other.checkpoint
    assert other.checkpoint.startswith("started afresh")
    assert not ckpt.exists()

    await interrupted()
    dry = await _gc(url, now, dry_run=True, checkpoint=ckpt)
    assert "deletes (this one is a dry run)" in dry.checkpoint

    ckpt.write_bytes(b"")  # an empty file: nothing to resume, nothing to say
    assert (await _gc(url, now, dry_run=True, checkpoint=ckpt)).checkpoint == ""
    head = {"t": "head", "kind": "kvstore-gc-checkpoint", "version": 99, "url": f"file://{url}", "t0": now}
    ckpt.write_bytes(_frame({**head, "grace": 0.0, "dry_run": True}))
    assert "state version 99" in (await _gc(url, now, dry_run=True, checkpoint=ckpt)).checkpoint

    await interrupted()
    later = await _gc(url, now + 1, checkpoint=ckpt)  # grace 0: one second is too old
    assert "more than the grace ago" in later.checkpoint
    assert later.ok
    assert later.freed_objects > 0
