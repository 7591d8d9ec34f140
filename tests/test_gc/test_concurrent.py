"""GC beside concurrent writers: with a grace of a few seconds, no prefix whose save returned is lost."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from gc_helpers import put_raw, run_gc_at

import kvstore
from kvstore.formats.keys import model_id
from kvstore.formats.layout import data_path

CHUNK = 4
GRACE = 2.0


@pytest.mark.parametrize(("backend", "seconds"), [("local", 6.0), ("moto", 8.0), ("rgw", 8.0)], indirect=["backend"])
async def test_gc_loop_beside_save_loops_loses_nothing(
    store_url: Any,
    seconds: float,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
) -> None:
    url, opts = store_url
    spec, retired_spec = make_spec(version="live"), make_spec(version="old")
    bases = [list(range(1000 * b, 1000 * b + 48)) for b in range(3)]
    base_kv = [make_kv(spec, 48, seed=b) for b in range(3)]
    async with kvstore.open(url, storage_options=opts, chunk_tokens=CHUNK) as store:
        await store.save_prefix(retired_spec, bases[0], base_kv[0])
        await store.retire("tiny", "old")
    saved: list[tuple[int, int]] = []
    # Run at least `seconds`, and on a slow machine until enough saves and GC runs happened.
    deadline = time.monotonic() + seconds
    hard_deadline = deadline + 120
    gc_runs: list[Any] = []
    writers_done = asyncio.Event()

    def writing() -> bool:
        now = time.monotonic()
        return now < hard_deadline and (now < deadline or len(saved) <= 8)

    def collecting() -> bool:
        return time.monotonic() < hard_deadline and (not writers_done.is_set() or len(gc_runs) < 2)

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        async with kvstore.open(url, storage_options=opts) as store:
            while writing():
                b, n = rng.randrange(3), rng.randrange(1, 49)
                await store.save_prefix(spec, bases[b][:n], [(k[:n], v[:n]) for k, v in base_kv[b]])
                saved.append((b, n))  # only after the save returned
                await asyncio.sleep(rng.random() * 0.02)

    async def crasher() -> None:  # leaves damaged data objects behind, for the GC to find
        rng = random.Random(99)
        mid = model_id(spec)
        while not writers_done.is_set():
            await put_raw(url, opts, {data_path(mid, rng.randbytes(32), CHUNK): b"orphan"})
            await asyncio.sleep(0.3)

    async def collector() -> None:
        while collecting():
            gc_runs.append(await run_gc_at(url, opts, grace=GRACE, now=time.time()))
            await asyncio.sleep(0.05)

    async def writers() -> None:
        await asyncio.gather(writer(1), writer(2), writer(3))
        writers_done.set()

    await asyncio.gather(writers(), crasher(), collector())
    print(f"{len(saved)} saves, {len(gc_runs)} GC runs")
    assert len(saved) > 8
    assert len(gc_runs) >= 2
    assert all(r.ok for r in gc_runs)
    freed = sum(r.freed_objects for r in gc_runs)
    assert freed > 0, "the GC loop never collected anything: the test proves nothing"
    async with kvstore.open(url, storage_options=opts) as store:
        for b, n in sorted(set(saved)):
            hit = await store.load_prefix(spec, bases[b][:n])
            assert hit.num_tokens == n, (b, n)
            assert hit.chunks_damaged == 0
            assert_kv_equal(hit.kv, [(k[:n], v[:n]) for k, v in base_kv[b]])
