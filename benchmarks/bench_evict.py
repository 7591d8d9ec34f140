"""Eviction by recency: the cost of access recording on the load path, and eviction throughput and memory.

    python benchmarks/bench_evict.py                  # (a) memory and local, (b) a local store of 100k chunks
    python benchmarks/bench_evict.py --chunks 20000 --repeats 30

(a) The same loads (and lookups) with ``record_access=True`` and ``False``, interleaved,
    on ``memory://`` and a local directory: median seconds per call and the ratio. Small
    chunks (16 tokens) so the per-chunk cost of recording shows as much as it can.
(b) A local store generated straight in the on-store format (valid data-object heads, tiny
    layers, as ``bench_gc.py`` does), one live model, chains of 8 chunks, data objects three
    days old, and one access record per 10,000 chunks with uses spread over two days; then
    ``run_gc(max_bytes=half)``: chunks/s planned (the pure ordering), chunks/s evicted (the
    eviction phase: its HEAD re-checks and deletes), the whole run's time, and peak memory
    (tracemalloc of a dry run with eviction, and the process's peak RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kvstore
from kvstore.formats.access import AccessRecord, access_prefix, access_record_name
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import key_root, model_id
from kvstore.formats.layout import ROOT_RECORD, data_path, metadata_path, model_record_path, zarr_array_metadata
from kvstore.formats.records import ChunkHeader, ModelRecord, RootRecord
from kvstore.formats.shard import data_object, encode_layers
from kvstore.gc import GCReport, run_gc
from kvstore.gc.evict import eviction_order, plan_prefix

DAY = 86400.0


# ---------------------------------------------------------------------- (a) the load path


async def _load_path(url: str, repeats: int) -> dict[str, float]:
    spec = kvstore.ModelSpec("bench", "v1", num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    n = 1024
    tokens = list(range(n))
    kv = [(torch.randn(n, 2, 64).half(), torch.randn(n, 2, 64).half()) for _ in range(spec.num_layers)]
    async with kvstore.open(url, chunk_tokens=16, record_access=False) as store:
        await store.save_prefix(spec, tokens, kv)
    times: dict[str, list[float]] = {}
    stores = {flag: await kvstore.open(url, record_access=flag) for flag in (False, True)}
    try:
        for _ in range(repeats):
            for flag, store in stores.items():
                t = time.perf_counter()
                assert (await store.load_prefix(spec, tokens)).num_tokens == n
                times.setdefault(f"load {flag}", []).append(time.perf_counter() - t)
                t = time.perf_counter()
                assert await store.lookup(spec, tokens) == n
                times.setdefault(f"lookup {flag}", []).append(time.perf_counter() - t)
    finally:
        for store in stores.values():
            await store.close()
    return {name: statistics.median(v) for name, v in times.items()}


def bench_load_path(repeats: int) -> None:
    print("(a) access recording on the load path: 64 chunks of 16 tokens, 4 layers (median of", repeats, "each)")
    print(f"{'backend':8} {'call':7} {'off ms':>9} {'on ms':>9} {'on/off':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in (("memory", f"memory://bench-evict-{os.getpid()}"), ("local", f"{tmp}/kv")):
            med = asyncio.run(_load_path(url, repeats))
            for call in ("load", "lookup"):
                off, on = med[f"{call} False"], med[f"{call} True"]
                print(f"{name:8} {call:7} {off * 1e3:9.3f} {on * 1e3:9.3f} {on / off:6.3f}x")


# ---------------------------------------------------------------------- (b) eviction throughput


def _generate(root: Path, chunks: int, chain: int) -> int:
    """A local store of ``chunks`` chunks of one live model; returns the bytes under chunks/."""
    spec = kvstore.ModelSpec("bench", "v1", num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float16)
    ct = 256
    mid = model_id(spec)
    codec = get_codec("none")
    root.mkdir(parents=True)
    (root / ROOT_RECORD).write_bytes(RootRecord(ct).to_msgpack())
    (root / model_record_path(mid)).parent.mkdir()
    (root / model_record_path(mid)).write_bytes(ModelRecord(mid, spec).to_msgpack())
    (root / metadata_path(mid, ct)).parent.mkdir(parents=True)
    (root / metadata_path(mid, ct)).write_bytes(zarr_array_metadata(spec, ct, "none"))
    rng = np.random.default_rng(0)
    old = time.time() - 3 * DAY
    layer = memoryview(b"\0\0\0\0")
    digests = rng.integers(0, 256, size=(chunks, 32), dtype=np.uint8)
    root64 = key_root(spec, ct)

    def write(i: int) -> int:
        key = digests[i].tobytes()
        parent = root64 if i % chain == 0 else digests[i - 1].tobytes()
        header = ChunkHeader(key, parent, i % chain, mid, ct, 1, "none")
        parts = data_object(header, encode_layers(codec, [(layer, layer)], 2))
        path = root / data_path(mid, key, ct)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(bytes(p) for p in parts)
        path.write_bytes(data)
        os.utime(path, (old, old))
        return len(data)

    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(write, range(chunks), chunksize=512))
    keys = digests[:, :8].copy().view(">u8").ravel().astype(np.uint64)
    times = (time.time() - 2 * DAY + rng.uniform(0, DAY, chunks)).astype(np.uint32)
    (root / access_prefix(mid)).mkdir(parents=True)
    for n, start in enumerate(range(0, chunks, 10_000)):
        rec = AccessRecord(mid, b"benchwrt", keys[start : start + 10_000], times[start : start + 10_000])
        (root / access_prefix(mid) / access_record_name(rec.last, rec.writer, n)).write_bytes(rec.to_msgpack())
    return total


class _Phases:
    """GC progress that notes when each phase started and finished."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}

    def start(self, phase: str, total: int | None) -> None:
        self.started[phase] = time.perf_counter()

    def advance(self, phase: str, n: int) -> None:
        pass

    def finish(self, phase: str) -> None:
        self.finished[phase] = time.perf_counter()


def _plan_rate(n: int) -> float:
    rng = np.random.default_rng(1)
    chain = 8
    keys = rng.integers(1, 2**63, n, dtype=np.uint64)
    parents = np.where(np.arange(n) % chain == 0, np.uint64(0), np.roll(keys, 1))
    index = np.arange(n) % chain
    sizes = np.full(n, 1 << 20, np.int64)
    last = rng.uniform(0, 1e6, n)
    t = time.perf_counter()
    cands = eviction_order([keys], [parents], [index], [sizes], [last])
    plan_prefix(cands, int(sizes.sum()), max_bytes=int(sizes.sum()) // 2, idle_before=None, protect_from=2e6)
    return n / (time.perf_counter() - t)


def bench_eviction(chunks: int) -> None:
    print(f"\n(b) eviction on a local store of {chunks:,} chunks ({2 * chunks:,} objects), one live model")
    for n in (100_000, 1_000_000):
        print(f"planning (pure order + plan) of {n:,} chunks: {_plan_rate(n):,.0f} chunks/s")
    tmp = Path(tempfile.mkdtemp(prefix="kv-bench-evict-"))
    try:
        url = str(tmp / "kv")
        t = time.perf_counter()
        total = _generate(tmp / "kv", chunks, 8)
        print(f"generated in {time.perf_counter() - t:.1f} s: {total / 1e6:.1f} MB under chunks/")
        tracemalloc.start()
        asyncio.run(run_gc(url, dry_run=True))
        _, base = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"dry run without eviction: peak Python heap {base / 2**20:.1f} MiB = {base / chunks:.0f} B per chunk")
        tracemalloc.start()
        dry: GCReport = asyncio.run(run_gc(url, max_bytes=total // 2, dry_run=True))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"dry run with eviction: {dry.evicted_chunks:,} chunks to evict, {dry.elapsed:.1f} s (under tracemalloc); "
            f"peak Python heap {peak / 2**20:.1f} MiB = {peak / chunks:.0f} B per chunk"
        )
        phases = _Phases()
        report: GCReport = asyncio.run(run_gc(url, max_bytes=total // 2, progress=phases))
        evict_s = phases.finished["evict"] - phases.started["evict"]
        mark_s = phases.finished["read"] - phases.started["list"]
        sweep_s = phases.finished["sweep"] - phases.started["sweep"]
        print(
            f"run: {report.evicted_chunks:,} chunks evicted ({report.evicted_bytes / 1e6:.1f} MB; budget met: "
            f"{report.budget_met}) in {report.elapsed:.1f} s: mark {mark_s:.1f} s, sweep {sweep_s:.1f} s, "
            f"eviction phase {evict_s:.1f} s = {report.evicted_chunks / evict_s:,.0f} chunks/s evicted "
            f"({2 * report.evicted_chunks / evict_s:,.0f} objects/s); "
            f"{report.access_records_read} access records read, {report.access_records_written} written"
        )
        print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_load:
        bench_load_path(args.repeats)
    bench_eviction(args.chunks)


if __name__ == "__main__":
    main()
