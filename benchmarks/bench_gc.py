"""GC throughput and memory: a local store of >= 100,000 chunk objects, and a smaller one on S3.

    python benchmarks/bench_gc.py                     # local (~60k objects) and moto (~3k objects)
    python benchmarks/bench_gc.py --server rgw        # S3 on Ceph's RADOS Gateway instead of moto
    python benchmarks/bench_gc.py --chunks 50000 --skip-s3

Objects are written straight in the on-store layout (not through save_prefix,
which would spend the time encoding tensors): valid root, model and retirement
records and chunk chains of data objects (format 2: a zarr.json and one data
object per chunk, whose header the GC reads; the layers are a few bytes, which
the GC does not check), so the GC does its real work. The mix: two live model
versions, one retired; 3% uncommitted chunks (a zarr.json and a writer's
temporary file), 2% chunks behind a broken chain. Everything is two hours old, so with the default
1 h grace all garbage goes.

Reported: objects listed per second (both listings), objects deleted per second,
wall time per run, peak Python heap during a dry run (tracemalloc) and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import torch
from _s3servers import add_server_option, fresh_store, s3_server

import kvstore
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import key_root, model_id
from kvstore.formats.layout import (
    ROOT_RECORD,
    chunk_prefix,
    data_path,
    model_record_path,
    retirement_record_path,
    zarr_array_metadata,
)
from kvstore.formats.records import ChunkHeader, ModelRecord, RetirementRecord, RootRecord
from kvstore.formats.shard import data_object, encode_layers
from kvstore.gc import GCReport, run_gc

CHUNK_TOKENS = 256
CHAIN = 8  # chunks per chain (a 2k-token prompt)


def _specs(layers: int) -> list[tuple[kvstore.ModelSpec, bool]]:
    def spec(version: str) -> kvstore.ModelSpec:
        return kvstore.ModelSpec("bench-llama", version, layers, 1, 8, torch.float16)

    return [(spec("v1"), True), (spec("v2"), False), (spec("v3"), False)]  # (spec, retired)


def store_objects(num_chunks: int, layers: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Every object of a synthetic store: records, chunk chains, and garbage."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = [(ROOT_RECORD, RootRecord(CHUNK_TOKENS).to_msgpack())]
    specs = _specs(layers)
    per_model = num_chunks // len(specs)
    half = memoryview(b"\x00" * 32)
    layers_parts = encode_layers(get_codec("none"), [(half, half)] * layers, 2)
    for spec, retired in specs:
        mid = model_id(spec)
        out.append((model_record_path(mid), ModelRecord(mid, spec).to_msgpack()))
        if retired:
            out.append((retirement_record_path(mid), RetirementRecord(mid, "bench@host").to_msgpack()))
        meta = zarr_array_metadata(spec, CHUNK_TOKENS, "none")
        root = key_root(spec, CHUNK_TOKENS)
        parent, index = root, 0
        for n in range(per_model):
            if n % CHAIN == 0:
                parent, index = root, 0
            key = blake3.blake3(parent + rng.randbytes(8)).digest()
            prefix = chunk_prefix(mid, key)
            kind = rng.random()
            out.append((prefix + "zarr.json", meta))
            if kind < 0.03:  # a crashed writer: no data object, a temporary file
                out.append((data_path(prefix) + ".tmp-0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f", b"partial"))
            else:
                chain_parent = rng.randbytes(32) if kind < 0.05 else parent  # 2%: the parent never existed
                header = ChunkHeader(key, chain_parent, index, mid, CHUNK_TOKENS, layers, "none")
                out.append((data_path(prefix), b"".join(data_object(header, layers_parts))))
            parent, index = key, index + 1
    return out


def write_local(root: Path, objects: list[tuple[str, bytes]], age: float) -> None:
    past = time.time() - age

    def write(item: tuple[str, bytes]) -> None:
        path = root / item[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item[1])
        os.utime(path, (past, past))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, objects, chunksize=256))


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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_line(label: str, report: GCReport, timer: PhaseTimer, wall: float) -> None:
    mark, sweep = timer.seconds("list"), timer.seconds("sweep")
    print(
        f"{label}: {report.objects_listed:,} objects, {report.commits_read:,} commit records read, "
        f"{report.freed_objects:,} deleted ({dict(report.reasons)})\n"
        f"  wall {wall:.2f} s | mark (list + read commits) {mark:.2f} s = {report.objects_listed / mark:,.0f} obj/s"
        f" | sweep (list + delete) {sweep:.2f} s = {report.objects_listed / sweep:,.0f} listed/s,"
        f" {report.freed_objects / sweep:,.0f} deleted/s"
    )


async def gc_once(url: str, options: dict[str, Any] | None, *, dry_run: bool) -> tuple[GCReport, PhaseTimer, float]:
    timer = PhaseTimer()
    t = time.perf_counter()
    report = await run_gc(url, storage_options=options, dry_run=dry_run, progress=timer)
    return report, timer, time.perf_counter() - t


def bench_local(num_chunks: int, layers: int, keep: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="kvgc-bench-"))
    try:
        t = time.perf_counter()
        objects = store_objects(num_chunks, layers)
        write_local(root, objects, age=7200)
        print(f"local store {root}: {len(objects):,} objects written in {time.perf_counter() - t:.1f} s")
        rss0 = _peak_rss_mib()
        tracemalloc.start()
        dry, _, dry_wall = asyncio.run(gc_once(str(root), None, dry_run=True))
        _, heap_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"  dry run (under tracemalloc) {dry_wall:.2f} s: would free {dry.freed_objects:,} objects; "
            f"peak Python heap {heap_peak / 2**20:.1f} MiB"
        )
        report, timer, wall = asyncio.run(gc_once(str(root), None, dry_run=False))
        report_line("local gc", report, timer, wall)
        print(f"  peak RSS {_peak_rss_mib():.0f} MiB (before GC {rss0:.0f} MiB: torch and friends)")
        if not report.ok or report.freed_objects != dry.freed_objects:
            raise SystemExit(f"GC freed {report.freed_objects} objects, the dry run promised {dry.freed_objects}")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def bench_s3(server_name: str, num_chunks: int, layers: int) -> None:
    with s3_server(server_name) as server:
        url, options = fresh_store(server, "gc")
        bucket, _, root = url.removeprefix("s3://").partition("/")
        client = server.client()
        objects = store_objects(num_chunks, layers, seed=1)
        t = time.perf_counter()
        put: Callable[[tuple[str, bytes]], Any] = lambda item: client.put_object(  # noqa: E731
            Bucket=bucket, Key=f"{root}/{item[0]}", Body=item[1]
        )
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, objects))
        print(f"{server.name} store: {len(objects):,} objects written in {time.perf_counter() - t:.1f} s")
        time.sleep(1.5)
        # Objects are seconds old here: use a zero grace by running with dry_run off and grace 0.
        timer = PhaseTimer()
        t = time.perf_counter()
        report = asyncio.run(run_gc(url, storage_options=options, grace=0, allow_short_grace=True, progress=timer))
        report_line(f"s3 ({server.name}) gc", report, timer, time.perf_counter() - t)
        assert report.ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=30_000, help="chunk directories in the local store")
    parser.add_argument("--layers", type=int, default=2, help="layers per chunk (a few bytes each)")
    parser.add_argument("--s3-chunks", type=int, default=1_500, help="chunk directories in the S3 store")
    parser.add_argument("--skip-s3", action="store_true")
    add_server_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the local store directory")
    args = parser.parse_args()
    bench_local(args.chunks, args.layers, args.keep)
    if not args.skip_s3:
        bench_s3(args.server, args.s3_chunks, args.layers)


if __name__ == "__main__":
    main()
