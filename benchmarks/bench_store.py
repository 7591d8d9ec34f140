"""Save and load throughput of kvstore, next to a raw-I/O floor measured in the same run.

    python benchmarks/bench_store.py                 # 32 layers x 8 heads x 128, bf16, 8192 tokens = 1 GiB
    python benchmarks/bench_store.py --quick         # a small run (64 MiB) to check that it works
    python benchmarks/bench_store.py --json out.json --dir /mnt/nvme/tmp

Every figure is the median of ``--reps`` repetitions (min-max in brackets), in
GB/s of logical (decoded) KV bytes, 1 GB = 1e9 bytes:

- save: a fresh, empty store each repetition, so nothing is deduplicated;
- save dedup: the same prompt saved again into a store that holds it (latency);
- load warm: objects in the page cache; load cold (local only): every file of the
  store evicted with ``posix_fadvise(DONTNEED)`` after ``sync`` before each repetition.

The floor moves exactly the same per-layer objects (same count and sizes, the
stored bytes) with the same concurrency pattern as kvstore: an
``asyncio.Semaphore(max_concurrency)`` around one ``asyncio.to_thread`` call per
object on the default executor. memory: ``MemoryFileSystem.pipe_file`` /
``cat_file`` plus a copy into the destination tensors. local: plain
``open/write`` to the final path (no temp file, rename or checksum) and
``os.open/preadv`` straight into the destination tensors (kvstore/storage/local.py's
read pattern). The floor's load lands in freshly allocated tensors like
kvstore's; "reused dst" repeats it into tensors allocated once, which isolates the
cost of first-touch page faults. kvstore writes 2-3 small objects per chunk
(zarr.json, commit record, tail marker) that the floor does not.

"CPU s/GB" is the process CPU time (every thread, user + system) per GB of KV:
on a shared or small machine it is steadier than wall-clock GB/s, and it says
how much of the cores a save or load takes from the inference engine.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import fsspec
import numpy as np
import torch

import kvstore
from kvstore.formats.codecs import get_codec

GB = 1e9
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# LMCache local-disk backend on this machine, 64 chunks of 4 MiB bf16 (from the issue).
REFERENCE = {"load_warm": 7.6, "load_cold": 1.16, "save": 1.86}
REFERENCE_NOTE = "LMCache local disk, 64 x 4 MiB bf16: retrieve 7.6 page cache / 1.16 cold, store 1.86 buffered"


# ---------------------------------------------------------------------- setup


@dataclass(frozen=True, slots=True)
class Setup:
    spec: kvstore.ModelSpec
    tokens: np.ndarray
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    chunk_tokens: int
    codec: str
    max_concurrency: int
    verify: bool

    @property
    def kv_bytes(self) -> int:
        return self.spec.bytes_per_token * len(self.tokens)

    @property
    def num_chunks(self) -> int:
        return -(-len(self.tokens) // self.chunk_tokens)

    def chunk_bounds(self) -> list[tuple[int, int]]:
        n = len(self.tokens)
        return [(s, min(s + self.chunk_tokens, n)) for s in range(0, n, self.chunk_tokens)]


def make_setup(args: argparse.Namespace) -> Setup:
    dtype = DTYPES[args.dtype]
    spec = kvstore.ModelSpec("bench-model", "v1", args.layers, args.kv_heads, args.head_dim, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, 128_000, (args.tokens,), generator=gen).numpy().astype(np.int64)
    shape = (args.tokens, args.kv_heads, args.head_dim)
    kv = [
        (torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype))
        for _ in range(args.layers)
    ]
    return Setup(spec, tokens, kv, args.chunk_tokens, args.codec, args.max_concurrency, args.verify)


def byte_view(t: torch.Tensor) -> np.ndarray:
    return t.view(-1).view(torch.uint8).numpy()


def layer_objects(setup: Setup) -> list[tuple[str, bytes]]:
    """The per-layer objects kvstore stores for the prompt: (relative name, stored bytes)."""
    codec = get_codec(setup.codec)
    itemsize = setup.kv[0][0].element_size()
    token_bytes = setup.spec.num_kv_heads * setup.spec.head_dim * itemsize
    out = []
    for c, (start, end) in enumerate(setup.chunk_bounds()):
        for layer, (k, v) in enumerate(setup.kv):
            parts = [byte_view(t)[start * token_bytes : end * token_bytes].data for t in (k, v)]
            out.append((f"{c}/{layer}", codec.encode(parts, itemsize)))
    return out


def fresh_outputs(setup: Setup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (len(setup.tokens), setup.spec.num_kv_heads, setup.spec.head_dim)
    return [(torch.empty(shape, dtype=setup.spec.dtype), torch.empty(shape, dtype=setup.spec.dtype)) for _ in setup.kv]


def destinations(setup: Setup, out: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[memoryview]]:
    """For each layer object (same order as ``layer_objects``), the K and V byte ranges it fills."""
    token_bytes = setup.spec.num_kv_heads * setup.spec.head_dim * out[0][0].element_size()
    views = [(byte_view(k), byte_view(v)) for k, v in out]
    return [
        [kb[start * token_bytes : end * token_bytes].data, vb[start * token_bytes : end * token_bytes].data]
        for start, end in setup.chunk_bounds()
        for kb, vb in views
    ]


# ---------------------------------------------------------------------- page cache


def _libc() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _files(root: str) -> Iterable[str]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield os.path.join(dirpath, name)


def resident_fraction(root: str) -> float | None:
    """Fraction of the pages of every file under ``root`` that are in the page cache (mincore), or None."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in _files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                npages = -(-size // page)
                vec = (ctypes.c_ubyte * npages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
                total += npages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


def evict(root: str) -> None:
    """Drop every file under ``root`` from the page cache (DONTNEED skips dirty pages, so sync first)."""
    os.sync()
    for path in _files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- floors


async def fan_out(limit: int, calls: Iterable[Callable[[], Any]]) -> None:
    """One ``asyncio.to_thread`` per call under a semaphore: the pattern kvstore uses per object."""
    sem = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Any]) -> None:
        async with sem:
            await asyncio.to_thread(call)

    async with asyncio.TaskGroup() as tg:
        for call in calls:
            tg.create_task(one(call))


def _write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read_into(path: str, buffers: list[memoryview]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, buffers, 0)
    finally:
        os.close(fd)


def _cat_into(fs: Any, path: str, buffers: list[memoryview]) -> None:
    data = memoryview(fs.cat_file(path))
    offset = 0
    for buf in buffers:  # a compressed object fills only a prefix of the buffers
        n = max(0, min(len(buf), len(data) - offset))
        buf[:n] = data[offset : offset + n]
        offset += n


class Floor:
    """Raw put/get of the same objects on one backend."""

    def __init__(self, backend: str, root: str, objects: list[tuple[str, bytes]], limit: int) -> None:
        self.backend = backend
        self.root = root
        self.objects = objects
        self.limit = limit
        self.fs = fsspec.filesystem("memory") if backend == "memory" else None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    async def put(self) -> None:
        if self.fs is not None:
            calls = [partial(self.fs.pipe_file, self._path(n), d) for n, d in self.objects]
        else:
            calls = [partial(_write_file, self._path(n), d) for n, d in self.objects]
        await fan_out(self.limit, calls)

    async def get(self, dests: list[list[memoryview]]) -> None:
        """Read every object into ``dests`` (raw stored bytes; for a compressed codec, a prefix of them)."""
        if self.fs is not None:
            calls = [
                partial(_cat_into, self.fs, self._path(n), b) for (n, _), b in zip(self.objects, dests, strict=True)
            ]
        else:
            calls = [partial(_read_into, self._path(n), b) for (n, _), b in zip(self.objects, dests, strict=True)]
        await fan_out(self.limit, calls)

    def clear(self) -> None:
        if self.fs is not None:
            if self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------- measurement


@dataclass
class Metric:
    """Samples of one operation: seconds per repetition, for kvstore and for the floor."""

    name: str
    nbytes: int
    kv: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    floor_reused: list[float] = field(default_factory=list)
    kv_cpu: list[float] = field(default_factory=list)
    floor_cpu: list[float] = field(default_factory=list)
    requests: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def rate(self, samples: list[float]) -> float | None:
        return self.nbytes / statistics.median(samples) / GB if samples else None

    def cpu_per_gb(self, samples: list[float]) -> float | None:
        """Median CPU seconds (all threads, user + system) per GB of KV."""
        return statistics.median(samples) / (self.nbytes / GB) if samples else None

    def to_json(self) -> dict[str, Any]:
        def summary(samples: list[float]) -> dict[str, Any] | None:
            if not samples:
                return None
            return {
                "seconds": samples,
                "median_s": statistics.median(samples),
                "median_gbps": self.nbytes / statistics.median(samples) / GB,
            }

        kv, fl = self.rate(self.kv), self.rate(self.floor)
        return {
            "bytes": self.nbytes,
            "kvstore": summary(self.kv),
            "floor": summary(self.floor),
            "floor_reused_dst": summary(self.floor_reused),
            "ratio": kv / fl if kv and fl else None,
            "kvstore_cpu_s_per_gb": self.cpu_per_gb(self.kv_cpu),
            "floor_cpu_s_per_gb": self.cpu_per_gb(self.floor_cpu),
            "requests_per_chunk": self.requests,
            "note": self.note,
        }


async def timed(aw: Awaitable[Any]) -> tuple[float, float, Any]:
    """Wall seconds, process CPU seconds (every thread, user + system) and the result of ``aw``."""
    c0, t0 = time.process_time(), time.perf_counter()
    result = await aw
    return time.perf_counter() - t0, time.process_time() - c0, result


def request_delta(before: kvstore.StoreStats, after: kvstore.StoreStats, chunks: int) -> dict[str, float]:
    out = {}
    for name in ("get", "put", "head", "list", "delete"):
        n = getattr(after, f"requests_{name}") - getattr(before, f"requests_{name}")
        if n:
            out[name] = n / chunks
    return out


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def check_equal(setup: Setup, hit: kvstore.LoadResult) -> None:
    if hit.num_tokens != len(setup.tokens):
        raise SystemExit(f"load returned {hit.num_tokens} tokens, expected {len(setup.tokens)}")
    for (k, v), (k2, v2) in zip(setup.kv, hit.kv, strict=True):
        if not (torch.equal(k, k2) and torch.equal(v, v2)):
            raise SystemExit("loaded KV differs from the saved KV")


async def bench_backend(backend: str, setup: Setup, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Every measurement for one backend; returns JSON-able results."""
    objects = layer_objects(setup)
    n = setup.num_chunks
    opts = {"codec": setup.codec, "max_concurrency": setup.max_concurrency, "verify": setup.verify}
    opts["chunk_tokens"] = setup.chunk_tokens
    mem = fsspec.filesystem("memory")
    tag = uuid.uuid4().hex[:8]

    def location(name: str) -> str:
        return f"memory://kvbench-{tag}/{name}" if backend == "memory" else os.path.join(workdir, name)

    def remove(name: str) -> None:
        if backend == "memory":
            path = f"/kvbench-{tag}/{name}"
            if mem.exists(path):
                mem.rm(path, recursive=True)
        else:
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)

    floor_root = f"/kvbench-{tag}/floor" if backend == "memory" else os.path.join(workdir, "floor")
    floor = Floor(backend, floor_root, objects, setup.max_concurrency)
    save = Metric("save", setup.kv_bytes)
    dedup = Metric("save dedup", setup.kv_bytes)
    warm = Metric("load warm", setup.kv_bytes)
    cold = Metric("load cold", setup.kv_bytes)
    lookup = Metric("lookup", setup.kv_bytes)
    metrics = [save, dedup, warm]

    # save: a fresh store each repetition, kvstore and floor interleaved
    for rep in range(-args.warmup, args.reps):  # negative: warm-up, not recorded
        name = f"save-{rep + args.warmup}"
        async with kvstore.open(location(name), **opts) as store:
            before = store.stats()
            kv_s, kv_c, result = await timed(store.save_prefix(setup.spec, setup.tokens, setup.kv))
            if result.chunks_written != n:
                raise SystemExit(f"fresh save wrote {result.chunks_written} chunks, expected {n}")
            save.requests = request_delta(before, store.stats(), n)
            save.note = f"{result.objects_written / n:.1f} objects/chunk, {result.bytes_written / GB:.3f} GB stored"
        if backend == "local":
            os.sync()  # write back now, so this repetition's dirty pages do not slow the next one
        if rep < args.reps - 1:
            remove(name)
        floor.clear()
        floor_s, floor_c, _ = await timed(floor.put())
        if backend == "local":
            os.sync()
        if rep >= 0:
            save.kv.append(kv_s)
            save.floor.append(floor_s)
            save.kv_cpu.append(kv_c)
            save.floor_cpu.append(floor_c)
        log(f"{backend} save rep {rep}: kvstore {kv_s:.3f} s, floor {floor_s:.3f} s")

    kept = location(f"save-{args.reps + args.warmup - 1}")
    async with kvstore.open(kept, **opts) as store:
        # dedup re-save: every chunk is present
        for _ in range(args.reps):
            before = store.stats()
            seconds, _, result = await timed(store.save_prefix(setup.spec, setup.tokens, setup.kv))
            if result.chunks_written:
                raise SystemExit("a re-save wrote chunks")
            dedup.kv.append(seconds)
            dedup.requests = request_delta(before, store.stats(), n)

        # lookup latency
        for _ in range(args.lookup_reps):
            before = store.stats()
            seconds, _, found = await timed(store.lookup(setup.spec, setup.tokens))
            if found != len(setup.tokens):
                raise SystemExit(f"lookup found {found} tokens, expected {len(setup.tokens)}")
            lookup.kv.append(seconds)
            lookup.requests = request_delta(before, store.stats(), n)

        # load warm: one untimed load fills the page cache and checks the bytes
        before = store.stats()
        hit = await store.load_prefix(setup.spec, setup.tokens)
        warm.requests = request_delta(before, store.stats(), n)
        check_equal(setup, hit)
        del hit
        reused = fresh_outputs(setup)
        reused_dests = destinations(setup, reused)
        for t, _ in reused:
            t.zero_()
        for _, t in reused:
            t.zero_()
        await floor.get(reused_dests)
        for rep in range(-args.warmup, args.reps):
            kv_s, kv_c, hit = await timed(store.load_prefix(setup.spec, setup.tokens))
            del hit
            floor_s, floor_c, _ = await timed(floor.get(destinations(setup, fresh_outputs(setup))))
            reused_s, _, _ = await timed(floor.get(reused_dests))
            if rep >= 0:
                warm.kv.append(kv_s)
                warm.floor.append(floor_s)
                warm.kv_cpu.append(kv_c)
                warm.floor_cpu.append(floor_c)
                warm.floor_reused.append(reused_s)
            log(f"{backend} load warm rep {rep}: kvstore {kv_s:.3f} s, floor {floor_s:.3f} s, reused {reused_s:.3f} s")

        # load cold (local): evict every file of the store before each repetition
        residency: list[float | None] = []
        if backend == "local":
            metrics.append(cold)
            for rep in range(args.cold_reps):
                evict(kept)
                residency.append(resident_fraction(kept))
                seconds, cpu, hit = await timed(store.load_prefix(setup.spec, setup.tokens))
                cold.kv.append(seconds)
                cold.kv_cpu.append(cpu)
                del hit
                evict(floor_root)
                residency.append(resident_fraction(floor_root))
                seconds, cpu, _ = await timed(floor.get(destinations(setup, fresh_outputs(setup))))
                cold.floor.append(seconds)
                cold.floor_cpu.append(cpu)
                log(f"{backend} load cold rep {rep}: kvstore {cold.kv[-1]:.3f} s, floor {cold.floor[-1]:.3f} s")
            known = [r for r in residency if r is not None]
            cold.note = (
                f"after eviction at most {max(known):.1%} of the pages were resident (mincore)"
                if known
                else "eviction not verified (mincore unavailable)"
            )
        del reused, reused_dests
    remove(f"save-{args.reps + args.warmup - 1}")
    floor.clear()
    metrics.append(lookup)
    return {m.name: m for m in metrics}


# ---------------------------------------------------------------------- report


def fmt_rate(m: Metric, samples: list[float]) -> str:
    if not samples:
        return "-"
    lo, hi = m.nbytes / max(samples) / GB, m.nbytes / min(samples) / GB
    return f"{m.nbytes / statistics.median(samples) / GB:6.2f} [{lo:.2f}-{hi:.2f}]"


def fmt_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:7.1f} ms [{min(samples) * 1e3:.1f}-{max(samples) * 1e3:.1f}]"


def target(backend: str, m: Metric) -> str:
    kv, fl = m.rate(m.kv), m.rate(m.floor)
    checks = []
    if m.name.startswith("load") and kv and fl:
        checks.append(f">=0.6x floor {'ok' if kv / fl >= 0.6 else 'MISS'}")
    if backend == "local" and m.name == "load cold" and kv:
        checks.append(f">=1.16 {'ok' if kv >= REFERENCE['load_cold'] else 'MISS'}")
    if backend == "local" and m.name == "load warm" and kv:
        checks.append(f">=3.8 {'ok' if kv >= REFERENCE['load_warm'] / 2 else 'MISS'}")
    return ", ".join(checks)


def reference(backend: str, m: Metric) -> str:
    if backend != "local":
        return ""
    key = {"save": "save", "load warm": "load_warm", "load cold": "load_cold"}.get(m.name)
    return f"{REFERENCE[key]:.2f}" if key else ""


def print_report(setup: Setup, args: argparse.Namespace, results: dict[str, dict[str, Metric]]) -> None:
    spec = setup.spec
    obj = setup.kv_bytes / setup.num_chunks / spec.num_layers
    print(
        f"\nkvstore {kvstore.__version__}: {spec.num_layers} layers x {spec.num_kv_heads} KV heads x {spec.head_dim}"
        f" {spec.dtype_name}, {len(setup.tokens)} tokens = {setup.kv_bytes / GB:.3f} GB of KV;"
        f" {setup.num_chunks} chunks of {setup.chunk_tokens} tokens x {spec.num_layers} layer objects"
        f" of {obj / 2**20:.2f} MiB"
    )
    print(
        f"codec {setup.codec}, verify {'on' if setup.verify else 'off'}, max_concurrency {setup.max_concurrency},"
        f" reps {args.reps} (cold {args.cold_reps}); GB/s = 1e9 B/s of KV, median [min-max]"
    )
    head = (
        f"{'backend':8} {'operation':12} {'kvstore GB/s':>22} {'floor GB/s':>22} {'ratio':>6} {'ref':>5}"
        f" {'CPU s/GB kv':>11} {'floor':>6}  target"
    )
    print(head)
    print("-" * len(head))
    for backend, metrics in results.items():
        for m in metrics.values():
            if m.name in ("save dedup", "lookup"):
                continue
            kv, fl = m.rate(m.kv), m.rate(m.floor)
            ratio = f"{kv / fl:6.2f}" if kv and fl else f"{'-':>6}"
            kc, fc = m.cpu_per_gb(m.kv_cpu), m.cpu_per_gb(m.floor_cpu)
            cpu = f"{kc:11.2f} {fc:6.2f}" if kc is not None and fc is not None else f"{'':11} {'':6}"
            print(
                f"{backend:8} {m.name:12} {fmt_rate(m, m.kv):>22} {fmt_rate(m, m.floor):>22} {ratio}"
                f" {reference(backend, m):>5} {cpu}  {target(backend, m)}"
            )
            if m.floor_reused:
                fr = m.rate(m.floor_reused)
                ratio = f"{kv / fr:6.2f}" if kv and fr else ""
                print(f"{'':8} {'  reused dst':12} {'':>22} {fmt_rate(m, m.floor_reused):>22} {ratio}")
    print()
    for backend, metrics in results.items():
        for name in ("save dedup", "lookup"):
            print(f"{backend:8} {name:12} {fmt_ms(metrics[name].kv)}")
    print("\nrequests per chunk (store.stats() deltas)")
    for backend, metrics in results.items():
        for m in metrics.values():
            if m.name == "load cold":
                continue
            reqs = ", ".join(f"{k} {v:.2f}" for k, v in m.requests.items())
            print(f"{backend:8} {m.name:12} {reqs}{'  (' + m.note + ')' if m.note else ''}")
        if "load cold" in metrics:
            print(f"{backend:8} {'load cold':12} {metrics['load cold'].note}")
    floor_local = "asyncio.to_thread(open/write) and asyncio.to_thread(os.open/preadv), default executor"
    floor_mem = "asyncio.to_thread(MemoryFileSystem.pipe_file / cat_file + copy), default executor"
    print(f"\nfloor: semaphore({setup.max_concurrency}) + one thread call per object; local: {floor_local};")
    print(f"       memory: {floor_mem}")
    print(f"ref:   {REFERENCE_NOTE}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--codec", default="none")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip checksum verification on load")
    p.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions before the save and warm-load reps")
    p.add_argument("--cold-reps", type=int, default=None, help="repetitions of the cold load (default: --reps)")
    p.add_argument("--lookup-reps", type=int, default=20)
    p.add_argument("--backends", default="memory,local", help="comma-separated: memory, local")
    p.add_argument("--dir", default=None, help="parent directory for the local store (default: a temp dir in /tmp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="a small run: 8 layers, 2048 tokens (64 MiB)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.tokens = 8, 2048
    if args.cold_reps is None:
        args.cold_reps = args.reps
    return args


async def run(args: argparse.Namespace) -> tuple[Setup, dict[str, dict[str, Metric]]]:
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f} before the run; other processes will skew the figures")
    setup = make_setup(args)
    log(f"generated {setup.kv_bytes / GB:.3f} GB of KV")
    results = {}
    for backend in args.backends.split(","):
        if backend not in ("memory", "local"):
            raise SystemExit(f"unknown backend {backend!r}")
        workdir = tempfile.mkdtemp(prefix="kvbench-", dir=args.dir or "/tmp")
        try:
            results[backend] = await bench_backend(backend, setup, args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return setup, results


def write_json(path: str, setup: Setup, args: argparse.Namespace, results: dict[str, dict[str, Metric]]) -> None:
    doc = {
        "config": {k: v for k, v in vars(args).items() if k != "json_path"},
        "kv_bytes": setup.kv_bytes,
        "num_chunks": setup.num_chunks,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kvstore": kvstore.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "reference": REFERENCE,
        "results": {b: {name: m.to_json() for name, m in ms.items()} for b, ms in results.items()},
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    setup, results = asyncio.run(run(args))
    print_report(setup, args, results)
    if args.json_path:
        write_json(args.json_path, setup, args, results)
    print(f"(bench_store took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
