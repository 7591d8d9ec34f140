"""Processes killed with SIGKILL mid-save and mid-GC: nothing committed is lost or served wrong."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import kvstore
from kvstore import gc as kvgc
from kvstore.storage import open_object_store

SPEC_CODE = """
import torch, kvstore
SPEC = kvstore.ModelSpec("crash", "v1", num_layers=8, num_kv_heads=2, head_dim=64, dtype=torch.float16)
def prompt(i):
    return list(range(1000, 1200)) + [i] * 56 + list(range(i, i + 200))
def kv_of(i):
    # A function of (position, token) only, so equal prefixes have equal KV, as with a real model.
    t = torch.tensor(prompt(i), dtype=torch.float64)[:, None, None]
    p = torch.arange(len(prompt(i)), dtype=torch.float64)[:, None, None]
    e = torch.arange(2 * 64, dtype=torch.float64).reshape(1, 2, 64)
    return [
        (torch.sin(t * 0.013 + p * 0.37 + e * 0.01 + layer).half(), torch.cos(t * 0.011 + p * 0.29 + e + layer).half())
        for layer in range(8)
    ]
"""
namespace: dict[str, object] = {}
exec(SPEC_CODE, namespace)  # the parent rebuilds exactly what the child saved
SPEC: kvstore.ModelSpec = namespace["SPEC"]  # type: ignore[assignment]


def _prompt(i: int) -> list[int]:
    return namespace["prompt"](i)  # type: ignore[operator, no-any-return]


def _kv(i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return namespace["kv_of"](i)  # type: ignore[operator, no-any-return]


WRITER = SPEC_CODE + textwrap.dedent(
    """
    import sys
    store = kvstore.sync.open(sys.argv[1], chunk_tokens=32)
    i = 0
    while True:
        store.save_prefix(SPEC, prompt(i), kv_of(i))
        print(i, flush=True)
        i += 1
    """
)


def _kill_after(proc: subprocess.Popen[str], lines: int) -> list[int]:
    """Read ``lines`` completion lines, then SIGKILL the child wherever it is."""
    assert proc.stdout is not None
    done = [int(proc.stdout.readline()) for _ in range(lines)]
    time.sleep(0.01 * (lines % 7))  # land somewhere inside the next save
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done += [int(line) for line in proc.stdout.read().split()]
    return done


async def _check_all(url: str, indices: range, saved: set[int]) -> None:
    """Every reported save loads in full and bit-exact; any other prompt is bit-exact or shorter."""
    async with kvstore.open(url) as store:
        for i in indices:
            hit = await store.load_prefix(SPEC, _prompt(i))
            assert hit.chunks_damaged == 0
            if i in saved:
                assert hit.num_tokens == len(_prompt(i)), i
            for (k, v), (ek, ev) in zip(hit.kv, _kv(i), strict=True):
                assert torch.equal(k, ek[: hit.num_tokens])
                assert torch.equal(v, ev[: hit.num_tokens])


def _writer_rounds(url: str, rounds: int) -> set[int]:
    """Run the writer ``rounds`` times, each killed inside a save; the prompts whose save returned."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    saved: set[int] = set()
    for round_ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True, env=env)
        saved |= set(_kill_after(proc, 2 + round_))
    return saved


def _gc_killed_after(url: str, delay: float) -> int:
    """Start a GC process, SIGKILL it ``delay`` seconds into its work; its return code."""
    proc = subprocess.Popen([sys.executable, "-c", GC_RUNNER, url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "start"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait(30)


async def test_sigkill_mid_save_loses_no_committed_prefix_and_gc_cleans_up(tmp_path: Path) -> None:
    url = str(tmp_path / "kv")
    saved = await asyncio.to_thread(_writer_rounds, url, 3)
    indices = range(max(saved) + 3)
    await _check_all(url, indices, saved)

    # A GC without grace removes what the crashes left and keeps every committed prefix.
    report = await kvgc.run_gc(url, grace=0, allow_short_grace=True)
    assert report.ok
    await _check_all(url, indices, saved)
    backend = await open_object_store(url)
    try:
        leftovers = [m.key async for m in backend.list("chunks/") if ".tmp-" in m.key]
        assert leftovers == []
        verified = await kvgc.verify_store(backend)
        assert verified.ok
        assert verified.chunks_checked > 0
    finally:
        await backend.close()


GC_RUNNER = textwrap.dedent(
    """
    import asyncio, sys
    from kvstore import gc as kvgc
    print("start", flush=True)
    asyncio.run(kvgc.run_gc(sys.argv[1], grace=0, allow_short_grace=True, concurrency=1))
    """
)


async def test_sigkill_mid_gc_leaves_a_consistent_store_that_the_next_gc_finishes(tmp_path: Path) -> None:
    url = str(tmp_path / "kv")
    prompts = range(12)
    async with kvstore.open(url, chunk_tokens=32) as store:
        retired = kvstore.ModelSpec("crash", "old", 8, 2, 64, torch.float16)
        for i in prompts:
            await store.save_prefix(SPEC, _prompt(i), _kv(i))
            await store.save_prefix(retired, _prompt(i), _kv(i))
        await store.retire("crash", "old")
    backend = await open_object_store(url)
    total = len([m async for m in backend.list("chunks/")])
    await backend.close()

    # Kill GCs at growing delays until one dies with garbage left behind: a kill mid-sweep.
    backend = await open_object_store(url)
    try:
        for delay in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
            code = await asyncio.to_thread(_gc_killed_after, url, delay)
            left = [m async for m in backend.list("chunks/")]
            if code == -signal.SIGKILL and len(left) < total:
                break
        else:
            raise AssertionError("no GC was killed mid-sweep")
    finally:
        await backend.close()

    await _check_all(url, prompts, set(prompts))  # the live version is untouched, whatever was swept
    report = await kvgc.run_gc(url, grace=0, allow_short_grace=True)
    assert report.ok
    again = await kvgc.run_gc(url, grace=0, allow_short_grace=True, dry_run=True)
    assert again.freed_objects == 0
    await _check_all(url, prompts, set(prompts))
