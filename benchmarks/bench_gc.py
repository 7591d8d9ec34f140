"""GC at fleet scale: throughput per phase, fan-out gain and memory per chunk, on a local store of 1M chunks and on S3.

    python benchmarks/bench_gc.py                           # local, 1,000,000 chunks (~2.1M objects; minutes)
    python benchmarks/bench_gc.py --chunks 100000 --skip-s3
    python benchmarks/bench_gc.py --skip-local --servers moto,rgw --s3-chunks 20000

Objects are written straight in the on-store layout (not through save_prefix,
which would spend the time encoding tensors), by worker processes: valid root,
model and retirement records, each model's array metadata, and chains of 8 chunks
in format 3 (one data object per chunk, with a valid index and header; the layers
are a few bytes, which the GC does not read); 10% of the chains end in a partial
chunk with its tail marker. The mix: two live model versions, one retired; 3%
chunks a crashed writer left as a temporary file only, 2% chunks whose parent never
existed (which breaks the rest of their chain). Everything is two hours old, so
with the default 1 h grace all garbage goes. Generation time is printed apart.

Reported per store:
- list: objects/s of one listing of chunks/ in one stream (``fan_out=1``) and fanned
  out (16 partitions at a time on S3, 4 locally) over the GC's plan (one partition
  per model, or per fan-out prefix chunks/<model>/<aa>/ of a big model) and over
  every model split into its fan-out prefixes; the gains are ratios of times;
- mark: objects listed/s and chunk headers read/s (list + ranged reads of headers);
- sweep: objects listed/s and deleted/s;
- memory: peak RSS of the real run above its start (VmHWM, reset through
  /proc/self/clear_refs) and, with ``--heap``, the peak Python heap of a dry run
  above its start (tracemalloc, numpy's arrays included; about 5x slower), each
  also per chunk of the store.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import blake3
import torch
from _s3servers import SERVER_NAMES, fresh_store, s3_server

import kvstore
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import key_root, model_id
from kvstore.formats.layout import (
    ROOT_RECORD,
    data_path,
    metadata_path,
    model_record_path,
    retirement_record_path,
    tails_prefix,
    zarr_array_metadata,
)
from kvstore.formats.records import ChunkHeader, ModelRecord, RetirementRecord, RootRecord
from kvstore.formats.shard import data_object, encode_layers
from kvstore.gc import GCReport, run_gc
from kvstore.gc.bulk import SPLIT_MIN, list_partition, open_bulk_ops, plan_partitions
from kvstore.storage import open_object_store

CHUNK_TOKENS = 256
CHAIN = 8  # chunks per chain (a 2k-token prompt)
MODELS = 3


@lru_cache(maxsize=8)
def _models(layers: int) -> tuple[tuple[kvstore.ModelSpec, bool, bytes, bytes, bytes], ...]:
    """(spec, retired, model id, key root, zarr.json) of each model version."""
    out = []
    for version, retired in (("v1", True), ("v2", False), ("v3", False)):
        spec = kvstore.ModelSpec("bench-llama", version, layers, 1, 8, torch.float16)
        meta = zarr_array_metadata(spec, CHUNK_TOKENS, "none")
        out.append((spec, retired, model_id(spec), key_root(spec, CHUNK_TOKENS), meta))
    return tuple(out)


def records(layers: int) -> list[tuple[str, bytes]]:
    """The root record, model records and the retirement record."""
    out = [(ROOT_RECORD, RootRecord(CHUNK_TOKENS).to_msgpack())]
    for spec, retired, mid, _, meta in _models(layers):
        out.append((model_record_path(mid), ModelRecord(mid, spec).to_msgpack()))
        out.append((metadata_path(mid, CHUNK_TOKENS), meta))  # the full chunks' array (tails' arrays: not written)
        if retired:
            out.append((retirement_record_path(mid), RetirementRecord(mid, "bench@host").to_msgpack()))
    return out


@lru_cache(maxsize=8)
def _layer_parts(layers: int) -> list[list[Any]]:
    half = memoryview(b"\x00" * 32)
    return encode_layers(get_codec("none"), [(half, half)] * layers, 2)


def chain_objects(layers: int, seed: int, chain: int) -> Iterator[tuple[str, bytes]]:
    """The objects of chain number ``chain`` (of model ``chain % 3``), deterministic in ``seed``."""
    rng = random.Random(f"{seed}/{chain}")
    _, _, mid, root, _ = _models(layers)[chain % MODELS]
    parts = _layer_parts(layers)
    parent = root
    tail = rng.random() < 0.1
    for index in range(CHAIN):
        key = blake3.blake3(parent + rng.randbytes(8)).digest()
        kind = rng.random()
        tokens = rng.randrange(1, CHUNK_TOKENS) if tail and index == CHAIN - 1 else CHUNK_TOKENS
        path = data_path(mid, key, tokens)
        if kind < 0.03:  # a crashed writer: no data object, a temporary file
            yield path + ".tmp-0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f", b"partial"
        else:
            chain_parent = rng.randbytes(32) if kind < 0.05 else parent  # 2%: the parent never existed
            header = ChunkHeader(key, chain_parent, index, mid, tokens, layers, "none")
            yield path, b"".join(data_object(header, parts))
            if tokens < CHUNK_TOKENS:
                yield f"{tails_prefix(mid, chain_parent)}{tokens}", key
        parent = key


def _write_local_chains(root: str, layers: int, seed: int, chains: range, past: float) -> int:
    """Worker process: write ``chains`` under ``root`` with modification time ``past``; the objects written."""
    n = 0
    made: set[str] = set()
    for chain in chains:
        for key, data in chain_objects(layers, seed, chain):
            path = os.path.join(root, key)
            parent = os.path.dirname(path)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            with open(path, "wb") as fh:
                fh.write(data)
            os.utime(path, (past, past))
            n += 1
        if len(made) > 100_000:
            made.clear()
    return n


def generate_local(root: Path, num_chunks: int, layers: int, workers: int, age: float = 7200) -> int:
    past = time.time() - age
    for key, data in records(layers):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    chains = num_chunks // CHAIN
    step = -(-chains // (workers * 8))
    with ProcessPoolExecutor(workers) as pool:
        futures = [
            pool.submit(_write_local_chains, str(root), layers, 0, range(i, min(i + step, chains)), past)
            for i in range(0, chains, step)
        ]
        return sum(f.result() for f in futures)


class PhaseTimer:
    """A GCProgress that records when each phase starts and finishes."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def start(self, phase: str, total: int | None) -> None:
        self.times[phase] = [time.perf_counter(), 0.0]

    def advance(self, phase: str, n: int) -> None:
        pass

    def finish(self, phase: str) -> None:
        self.times[phase][1] = time.perf_counter()

    def seconds(self, phase: str) -> float:
        start, end = self.times[phase]
        return end - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


async def listing_seconds(
    url: str, options: dict[str, Any] | None, fan_out: int, split_min: int = SPLIT_MIN
) -> tuple[int, int, float]:
    """(objects, partitions, seconds) of listing chunks/ partition by partition, ``fan_out`` at a time."""
    backend = await open_object_store(url, options)
    try:
        async with open_bulk_ops(backend, url, options, fan_out=fan_out, split_min=split_min) as bulk:
            t = time.perf_counter()
            plan = await plan_partitions(bulk, "chunks/")
            limit = asyncio.Semaphore(bulk.fan_out)

            async def count(part: Any) -> int:
                async with limit:
                    return sum([1 async for _ in list_partition(bulk, part)])

            n = sum(await asyncio.gather(*(count(p) for p in plan)))
            return n, len(plan), time.perf_counter() - t
    finally:
        await backend.close()


def bench_listing(url: str, options: dict[str, Any] | None, label: str) -> None:
    """One stream, the GC's plan (a model split when big), every model split into its 256 fan-out prefixes."""
    fan = 16 if url.startswith("s3://") else 4
    n0, _, cold = asyncio.run(listing_seconds(url, options, 1))  # also warms caches for what follows
    n1, _, seq = asyncio.run(listing_seconds(url, options, 1))
    n2, p2, planned = asyncio.run(listing_seconds(url, options, fan))
    n3, p3, split = asyncio.run(listing_seconds(url, options, fan, split_min=0))
    assert n0 == n1 == n2 == n3, (n0, n1, n2, n3)
    print(
        f"  {label} list chunks/: {n1:,} objects | one stream {seq:.2f} s = {n1 / seq:,.0f} obj/s "
        f"(first, colder: {cold:.2f} s)\n"
        f"    fanned out x{fan}, GC's plan ({p2} partitions): {planned:.2f} s = {n1 / planned:,.0f} obj/s, "
        f"gain {seq / planned:.2f}x | every model split ({p3} partitions): {split:.2f} s = {n1 / split:,.0f} obj/s, "
        f"gain {seq / split:.2f}x"
    )


def gc_runs(url: str, options: dict[str, Any] | None, chunks: int, label: str, *, grace: float, heap: bool) -> None:
    """With ``heap``, a dry run under tracemalloc (about 5x slower) first; then the real run (rates, peak RSS)."""
    short = grace <= 60

    async def once(dry_run: bool, timer: PhaseTimer) -> GCReport:
        return await run_gc(
            url, storage_options=options, grace=grace, allow_short_grace=short, dry_run=dry_run, progress=timer
        )

    dry: GCReport | None = None
    if heap:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        dry = asyncio.run(once(True, PhaseTimer()))
        dry_wall = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        print(
            f"  {label} dry run (under tracemalloc) {dry_wall:.1f} s: would free {dry.freed_objects:,} objects; "
            f"peak heap +{peak / 2**20:.1f} MiB = {peak / chunks:.1f} B per chunk "
            f"({peak / max(dry.commits_read, 1):.1f} B per header read)"
        )
    reset = _reset_peak_rss()
    rss0 = _status_kib("VmRSS")
    timer = PhaseTimer()
    t = time.perf_counter()
    report = asyncio.run(once(False, timer))
    wall = time.perf_counter() - t
    rss = (_status_kib("VmHWM") - rss0) * 1024
    mark, sweep = timer.seconds("list"), timer.seconds("sweep")
    print(
        f"  {label} gc {wall:.1f} s: {report.objects_listed:,} objects, {report.commits_read:,} headers read, "
        f"{report.chunks_reachable:,} reachable, {report.freed_objects:,} deleted {dict(report.reasons)}\n"
        f"    mark {mark:.1f} s = {report.objects_listed / mark:,.0f} listed/s, "
        f"{report.commits_read / mark:,.0f} headers/s | sweep {sweep:.1f} s = "
        f"{report.objects_listed / sweep:,.0f} listed/s, {report.freed_objects / sweep:,.0f} deleted/s | "
        + (f"peak RSS +{rss / 2**20:.0f} MiB = {rss / chunks:.0f} B per chunk" if reset else "peak RSS: n/a")
    )
    if not report.ok or (dry is not None and report.freed_objects != dry.freed_objects):
        raise SystemExit(f"GC freed {report.freed_objects} objects, the dry run promised {dry and dry.freed_objects}")


def bench_local(num_chunks: int, layers: int, workers: int, parent: str | None, keep: bool, heap: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="kvgc-bench-", dir=parent))
    try:
        t = time.perf_counter()
        n = generate_local(root, num_chunks, layers, workers)
        print(f"local store {root}: {num_chunks:,} chunks, {n:,} objects generated in {time.perf_counter() - t:.1f} s")
        bench_listing(str(root), None, "local")
        gc_runs(str(root), None, num_chunks, "local", grace=3600, heap=heap)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def bench_s3(server_name: str, num_chunks: int, layers: int, heap: bool) -> None:
    with s3_server(server_name) as server:
        url, options = fresh_store(server, "gc")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client = server.client()
        t = time.perf_counter()

        def objects() -> Iterator[tuple[str, bytes]]:
            yield from records(layers)
            for chain in range(num_chunks // CHAIN):
                yield from chain_objects(layers, 1, chain)

        def put(item: tuple[str, bytes]) -> None:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{item[0]}", Body=item[1])

        with ThreadPoolExecutor(16) as pool:
            n = sum(1 for _ in pool.map(put, objects()))
        print(f"{server.name}: {num_chunks:,} chunks, {n:,} objects written in {time.perf_counter() - t:.1f} s")
        time.sleep(1.5)  # S3 times have 1 s resolution: a grace of 0 then finds every object older than the cutoff
        bench_listing(url, options, server.name)
        gc_runs(url, options, num_chunks, server.name, grace=0, heap=heap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1_000_000, help="chunks in the local store")
    parser.add_argument("--layers", type=int, default=2, help="layers per chunk (a few bytes each)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the local store")
    parser.add_argument("--dir", default=None, help="parent directory of the local store (default: the temp dir)")
    parser.add_argument("--s3-chunks", default="20000", help="chunks in each S3 store (one figure, or per server)")
    parser.add_argument("--servers", default="moto", help=f"comma-separated, of {', '.join(SERVER_NAMES)}")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the local store directory")
    parser.add_argument("--heap", action="store_true", help="first a dry run under tracemalloc (about 5x slower)")
    args = parser.parse_args()
    if not args.skip_local:
        bench_local(args.chunks, args.layers, args.workers, args.dir, args.keep, args.heap)
    if not args.skip_s3:
        servers = args.servers.split(",")
        sizes = [int(s) for s in args.s3_chunks.split(",")]
        for name, size in zip(servers, sizes * len(servers) if len(sizes) == 1 else sizes, strict=True):
            bench_s3(name, size, args.layers, args.heap)


if __name__ == "__main__":
    main()
