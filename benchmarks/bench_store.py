"""Save and load throughput of kvstore next to a raw-I/O floor measured in the same run, and requests per chunk.

    python benchmarks/bench_store.py                                  # both payloads, memory + local
    python benchmarks/bench_store.py --backends local,s3 --server rgw # S3 on Ceph RGW (or moto)
    python benchmarks/bench_store.py --payloads small-head --quick    # a short run to check that it works

Payloads (bf16, chunks of 256 tokens):

- ``large``: 32 layers x 8 KV heads x 128, 8192 tokens = 1 GiB (32 chunks of 32 MiB);
- ``small-head``: 16 layers x 4 KV heads x 64, 16384 tokens = 268 MB (64 chunks of 4 MiB) — the shape
  issue 10 measured LMCache on (one 4 MiB object per chunk).

Every figure is the median of ``--reps`` repetitions, in GB/s of KV (1 GB = 1e9 bytes), checksums on
unless ``--no-verify``. The floor moves the very same bytes as one object per chunk, with the same
concurrency (``max_concurrency``), into freshly allocated tensors:

- local: ``open/writev`` of each chunk's object; ``os.open`` + one ``preadv`` per chunk scattering its
  layers straight into the destination tensors (no header, no checksum);
- memory: ``MemoryFileSystem.pipe_file`` / ``cat_file`` + a copy into the destination tensors;
- s3: raw aiobotocore ``put_object`` / ``get_object`` of one object per chunk + a copy into the tensors.

kvstore's timed saves go to one store kept open, each under a new model version (every chunk, its
model record and its ``zarr.json`` written), the previous version's chunks deleted between them,
untimed; the loads open a store of their own.

"floor+crc" is the same floor doing the integrity work kvstore does, and nothing else: the crc32c
of every layer's K and V bytes (kvstore's own ``crc32c``), before the write of a chunk and after its
read, in the same worker thread. Where checksums are memory-bound, no verified load can beat it:
"ratio" is kvstore against the raw floor (issue 10's target), "/ +crc" against this one.

"concurrent loads" loads 8 prompts of 1024 tokens of the large shape (128 MiB each) one after
another, then all 8 at once, and prints both aggregate rates: the second must not fall below the first.
"CPU s/GB" is the process CPU time (all threads) per GB of KV.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

import kvstore
from kvstore.formats.keys import model_id
from kvstore.formats.layout import model_chunks_prefix
from kvstore.formats.shard import crc32c
from kvstore.storage.fsspec_store import TRANSPORT_OPTION

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _s3servers import add_transport_option

GB = 1e9
PAYLOADS = {"large": (32, 8, 128, 8192), "small-head": (16, 4, 64, 16384)}
CHUNK = 256
# LMCache 0.5.6 on this machine, small-head payload (issue 10): local disk, S3 on moto; GB/s.
REFERENCE = {("local", "load"): 3.5, ("s3", "load"): 0.376, ("s3", "save"): 0.113}


@dataclass(frozen=True, slots=True)
class Payload:
    name: str
    spec: kvstore.ModelSpec
    tokens: np.ndarray
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return self.spec.bytes_per_token * len(self.tokens)

    @property
    def chunks(self) -> int:
        return -(-len(self.tokens) // CHUNK)


def make_payload(name: str, quick: bool, seed: int = 0) -> Payload:
    layers, heads, dim, tokens = PAYLOADS[name]
    if quick:
        tokens //= 8
    spec = kvstore.ModelSpec(f"bench-{name}", "v1", layers, heads, dim, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 128_000, (tokens,), generator=gen).numpy().astype(np.int64)
    shape = (tokens, heads, dim)
    kv = [
        (torch.randn(shape, generator=gen).bfloat16(), torch.randn(shape, generator=gen).bfloat16())
        for _ in range(layers)
    ]
    return Payload(name, spec, toks, kv)


def byte_view(t: torch.Tensor) -> np.ndarray:
    return t.view(-1).view(torch.uint8).numpy()


def fresh_outputs(p: Payload) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (len(p.tokens), p.spec.num_kv_heads, p.spec.head_dim)
    return [(torch.empty(shape, dtype=p.spec.dtype), torch.empty(shape, dtype=p.spec.dtype)) for _ in p.kv]


def chunk_layers(p: Payload, kv: list[tuple[torch.Tensor, torch.Tensor]], c: int) -> list[memoryview]:
    """Chunk ``c``'s bytes in ``kv``, layer by layer, K then V: what the floor moves as one object."""
    row = p.spec.row_bytes
    lo, hi = c * CHUNK * row, min((c + 1) * CHUNK, len(p.tokens)) * row
    return [byte_view(t)[lo:hi].data for k, v in kv for t in (k, v)]


def crc_layers(parts: list[memoryview]) -> None:
    """The crc32c of each layer's (K, V) pair, as kvstore computes on save and checks on load."""
    for i in range(0, len(parts), 2):
        crc32c(parts[i : i + 2])


# ---------------------------------------------------------------------- floors


class Floor:
    """Raw put/get of one object per chunk (the same bytes kvstore moves, minus header and checksums)."""

    def __init__(self, backend: str, root: str, limit: int, s3: tuple[str, dict[str, Any]] | None = None) -> None:
        self.backend, self.root, self.limit, self.s3 = backend, root, limit, s3
        self.fs = fsspec.filesystem("memory") if backend == "memory" else None
        self._client: Any = None
        self._ctx: Any = None

    async def __aenter__(self) -> Floor:
        if self.backend == "s3":
            import aioboto3
            from botocore.config import Config

            assert self.s3 is not None
            _, opts = self.s3
            session = aioboto3.Session(
                aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"], region_name="us-east-1"
            )
            config = Config(
                max_pool_connections=self.limit,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            self._ctx = session.client("s3", endpoint_url=opts["endpoint_url"], config=config)
            self._client = await self._ctx.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ctx is not None:
            await self._ctx.__aexit__(None, None, None)

    def _bucket_key(self, c: int) -> tuple[str, str]:
        assert self.s3 is not None
        bucket, _, prefix = self.s3[0].removeprefix("s3://").partition("/")
        return bucket, f"{prefix}/floor/{self.root}/{c}"

    async def _fan(self, calls: list[Callable[[], Awaitable[None]]]) -> None:
        sem = asyncio.Semaphore(self.limit)

        async def one(call: Callable[[], Awaitable[None]]) -> None:
            async with sem:
                await call()

        async with asyncio.TaskGroup() as tg:
            for call in calls:
                tg.create_task(one(call))

    def clear(self) -> None:
        """Remove the floor's objects (local, memory): each save writes new files, as kvstore's does."""
        if self.backend == "local":
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.fs is not None and self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    async def put(self, p: Payload, *, crc: bool = False) -> None:
        """One object per chunk; with ``crc``, each layer's crc32c first, in the writing thread."""

        def checked(parts: list[memoryview]) -> list[memoryview]:
            if crc:
                crc_layers(parts)
            return parts

        async def one(c: int) -> None:
            parts = chunk_layers(p, p.kv, c)
            if self.backend == "local":
                await asyncio.to_thread(lambda: _write(os.path.join(self.root, str(c)), checked(parts)))
            elif self.backend == "memory":
                assert self.fs is not None
                await asyncio.to_thread(lambda: self.fs.pipe_file(f"{self.root}/{c}", b"".join(checked(parts))))
            else:
                bucket, key = self._bucket_key(c)
                body = await asyncio.to_thread(lambda: b"".join(checked(parts)))
                await self._client.put_object(Bucket=bucket, Key=key, Body=body)

        await self._fan([lambda c=c: one(c) for c in range(p.chunks)])

    async def get(self, p: Payload, out: list[tuple[torch.Tensor, torch.Tensor]], *, crc: bool = False) -> None:
        """One object per chunk into ``out``; with ``crc``, each layer's crc32c after, in the reading thread."""

        def checked(dest: list[memoryview]) -> None:
            if crc:
                crc_layers(dest)

        async def one(c: int) -> None:
            dest = chunk_layers(p, out, c)
            if self.backend == "local":
                path = os.path.join(self.root, str(c))
                await asyncio.to_thread(lambda: (_preadv(path, dest), checked(dest)))
            elif self.backend == "memory":
                assert self.fs is not None
                data = await asyncio.to_thread(self.fs.cat_file, f"{self.root}/{c}")
                await asyncio.to_thread(lambda: (_scatter(memoryview(data), dest), checked(dest)))
            else:
                bucket, key = self._bucket_key(c)
                resp = await self._client.get_object(Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    data = await body.read()
                await asyncio.to_thread(lambda: (_scatter(memoryview(data), dest), checked(dest)))

        await self._fan([lambda c=c: one(c) for c in range(p.chunks)])


def settle(backend: str) -> None:
    """Before a timed local save: write back the dirty pages of the last one, so it does not slow this one."""
    if backend == "local":
        os.sync()


def _write(path: str, parts: list[memoryview]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.writev(fd, parts)
    finally:
        os.close(fd)


def _preadv(path: str, dest: list[memoryview]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, dest, 0)
    finally:
        os.close(fd)


def _scatter(data: memoryview, dest: list[memoryview]) -> None:
    offset = 0
    for d in dest:
        d[:] = data[offset : offset + len(d)]
        offset += len(d)


# ---------------------------------------------------------------------- measurement


@dataclass
class Row:
    """One operation on one backend and payload: seconds per repetition for kvstore and the floor."""

    payload: str
    backend: str
    op: str
    nbytes: int
    kv: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    floor_crc: list[float] = field(default_factory=list)
    kv_cpu: list[float] = field(default_factory=list)
    requests: str = ""

    def rate(self, samples: list[float]) -> float | None:
        return self.nbytes / statistics.median(samples) / GB if samples else None

    def ratio(self, floor: list[float] | None = None) -> float | None:
        kv, fl = self.rate(self.kv), self.rate(self.floor if floor is None else floor)
        return kv / fl if kv and fl else None


async def timed(aw: Awaitable[Any]) -> tuple[float, float, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    result = await aw
    return time.perf_counter() - t0, time.process_time() - c0, result


def per_chunk(before: kvstore.StoreStats, after: kvstore.StoreStats, chunks: int) -> str:
    parts = []
    for name in ("head", "get", "put", "list", "delete"):
        n = getattr(after, f"requests_{name}") - getattr(before, f"requests_{name}")
        if n:
            parts.append(f"{name.upper()} {n / chunks:.2f}")
    return ", ".join(parts) or "none"


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def check(p: Payload, hit: kvstore.LoadResult, n: int | None = None) -> None:
    n = len(p.tokens) if n is None else n
    if hit.num_tokens != n:
        raise SystemExit(f"load returned {hit.num_tokens} tokens, expected {n}")
    for (k, v), (k2, v2) in zip(p.kv, hit.kv, strict=True):
        if not (torch.equal(k[:n], k2) and torch.equal(v[:n], v2)):
            raise SystemExit("loaded KV differs from the saved KV")


def drop_model(url: str, storage_options: dict[str, Any] | None, spec: kvstore.ModelSpec) -> None:
    """Delete a model version's chunks from the store at ``url`` (untimed, between repetitions)."""
    options = {k: v for k, v in (storage_options or {}).items() if k != TRANSPORT_OPTION}  # kvstore's, not s3fs's
    fs, root = fsspec.core.url_to_fs(url, **options)
    path = f"{root.rstrip('/')}/{model_chunks_prefix(model_id(spec))}".rstrip("/")
    if fs.exists(path):
        fs.rm(path, recursive=True)


async def save_floors(fl: Floor, p: Payload, backend: str, rep: int, s: float, c: float, row: Row) -> None:
    """The raw write floors after kvstore's save of repetition ``rep`` (``s`` seconds, ``c`` CPU seconds)."""
    fl.clear()
    settle(backend)
    f, _, _ = await timed(fl.put(p))
    fl.clear()
    settle(backend)
    fc, _, _ = await timed(fl.put(p, crc=True))
    if rep >= 0:
        row.kv.append(s)
        row.kv_cpu.append(c)
        row.floor.append(f)
        row.floor_crc.append(fc)
    log(f"{p.name} {backend} save: kvstore {s:.3f} s, floor {f:.3f} s, floor+crc {fc:.3f} s")


async def bench(
    p: Payload, backend: str, args: argparse.Namespace, where: Callable[[str], tuple[str, dict[str, Any] | None]]
) -> list[Row]:
    opts: dict[str, Any] = {"max_concurrency": args.max_concurrency, "verify": args.verify, "chunk_tokens": CHUNK}
    rows = {op: Row(p.name, backend, op, p.nbytes) for op in ("save", "load", "load layers", "first layer")}
    floor_root, floor_s3 = where("floor")
    s3 = (floor_root, floor_s3) if backend == "s3" and floor_s3 is not None else None
    async with Floor(backend, floor_root if backend != "s3" else uuid.uuid4().hex[:8], args.max_concurrency, s3) as fl:
        # One store kept open, as a serving engine keeps it; each save is of a new model version, so every chunk
        # is new and the save writes its model record and zarr.json too. The previous version's chunks go first:
        # moto keeps every object in memory, and its saves slow down as they pile up.
        url, so = where("store")
        spec = p.spec
        async with kvstore.open(url, storage_options=so, **opts) as store:
            for rep in range(-1, args.reps):  # rep -1: warm-up
                if rep >= 0:  # the previous repetition's chunks: the store holds one save's at a time
                    drop_model(url, so, spec)
                spec = dataclasses.replace(p.spec, version=f"{p.spec.version}-{rep + 1}")
                settle(backend)
                before = store.stats()
                s, c, res = await timed(store.save_prefix(spec, p.tokens, p.kv))
                assert res.chunks_written == p.chunks, res
                objects = res.objects_written / p.chunks
                rows["save"].requests = f"{per_chunk(before, store.stats(), p.chunks)} ({objects:.2f} objects)"
                await save_floors(fl, p, backend, rep, s, c, rows["save"])
        p = dataclasses.replace(p, spec=spec)  # the loads read the last save
        async with kvstore.open(url, storage_options=so, **opts) as store:
            before = store.stats()
            check(p, await store.load_prefix(p.spec, p.tokens))  # warms the page cache; checks the bytes
            rows["load"].requests = per_chunk(before, store.stats(), p.chunks)
            before = store.stats()
            async with store.load_prefix_layers(p.spec, p.tokens) as layers:
                async for _ in layers:
                    pass
            rows["load layers"].requests = per_chunk(before, store.stats(), p.chunks)
            for rep in range(-1, args.reps):
                s, c, hit = await timed(store.load_prefix(p.spec, p.tokens))
                del hit
                f, _, _ = await timed(fl.get(p, fresh_outputs(p)))
                fc, _, _ = await timed(fl.get(p, fresh_outputs(p), crc=True))
                t0 = time.perf_counter()
                first = 0.0
                async with store.load_prefix_layers(p.spec, p.tokens) as layers:
                    async for layer, _, _ in layers:
                        if layer == 0:
                            first = time.perf_counter() - t0
                total = time.perf_counter() - t0
                if rep >= 0:
                    rows["load"].kv.append(s)
                    rows["load"].kv_cpu.append(c)
                    rows["load"].floor.append(f)
                    rows["load"].floor_crc.append(fc)
                    rows["load layers"].kv.append(total)
                    rows["first layer"].kv.append(first)
                log(
                    f"{p.name} {backend} load: kvstore {s:.3f} s, floor {f:.3f} s, floor+crc {fc:.3f} s,"
                    f" layers {total:.3f} (first {first:.3f})"
                )
            before = store.stats()
            look = [(await timed(store.lookup(p.spec, p.tokens)))[0] for _ in range(5)]
            lookup_req = per_chunk(before, store.stats(), 5 * p.chunks)
            before = store.stats()
            dedup = [(await timed(store.save_prefix(p.spec, p.tokens, p.kv)))[0] for _ in range(3)]
            dedup_req = per_chunk(before, store.stats(), 3 * p.chunks)
    out = list(rows.values())
    out.append(Row(p.name, backend, "lookup", p.nbytes, kv=look, requests=lookup_req))
    out.append(Row(p.name, backend, "dedup save", p.nbytes, kv=dedup, requests=dedup_req))
    return out


async def bench_concurrent(
    backend: str, args: argparse.Namespace, where: Callable[[str], tuple[str, dict[str, Any] | None]]
) -> Row:
    """8 prompts of 1024 tokens of the large shape: loaded one after another, then all at once."""
    layers, heads, dim, _ = PAYLOADS["large"]
    n, count = (128 if args.quick else 1024), 8
    spec = kvstore.ModelSpec("bench-concurrent", "v1", layers, heads, dim, torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    prompts = [
        Payload(
            "concurrent",
            spec,
            torch.randint(0, 128_000, (n,), generator=gen).numpy().astype(np.int64),
            [(torch.randn(n, heads, dim, generator=gen).bfloat16(),) * 2 for _ in range(layers)],
        )
        for _ in range(count)
    ]
    url, so = where("concurrent")
    row = Row("large x8", backend, "concurrent loads", sum(p.nbytes for p in prompts))
    async with kvstore.open(url, storage_options=so, chunk_tokens=CHUNK, max_concurrency=args.max_concurrency) as store:
        for p in prompts:
            await store.save_prefix(p.spec, p.tokens, p.kv)
        for p in prompts:
            check(p, await store.load_prefix(p.spec, p.tokens))
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for p in prompts:
                await store.load_prefix(p.spec, p.tokens)
            row.floor.append(time.perf_counter() - t0)  # "floor" column: one after another
            t0 = time.perf_counter()
            hits = await asyncio.gather(*(store.load_prefix(p.spec, p.tokens) for p in prompts))
            row.kv.append(time.perf_counter() - t0)
            assert all(h.num_tokens == n for h in hits)
            del hits
            log(f"concurrent {backend}: serial {row.floor[-1]:.3f} s, all at once {row.kv[-1]:.3f} s")
    return row


# ---------------------------------------------------------------------- report


def fmt(row: Row, samples: list[float]) -> str:
    r = row.rate(samples)
    if r is None:
        return "-"
    lo, hi = row.nbytes / max(samples) / GB, row.nbytes / min(samples) / GB
    return f"{r:.2f} [{lo:.2f}-{hi:.2f}]"


def report(rows: list[Row], concurrent: list[Row], args: argparse.Namespace, server: str) -> None:
    print(
        f"\nkvstore {kvstore.__version__}, format v{kvstore.FORMAT_VERSION}:"
        f" checksums {'on' if args.verify else 'off'},"
        f" max_concurrency {args.max_concurrency}, medians of {args.reps}; s3 server: {server}"
    )
    head = (
        f"{'payload':11} {'backend':7} {'operation':12} {'kvstore GB/s':>20} {'floor GB/s':>20}"
        f" {'floor+crc GB/s':>20} {'ratio':>6} {'/ +crc':>6} {'CPU s/GB':>8} {'LMCache':>7}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        if row.op in ("lookup", "dedup save", "first layer"):
            continue
        ratio, ratio_crc = row.ratio(), row.ratio(row.floor_crc)
        cpu = statistics.median(row.kv_cpu) / (row.nbytes / GB) if row.kv_cpu else None
        ref = REFERENCE.get((row.backend, row.op)) if row.payload == "small-head" else None
        print(
            f"{row.payload:11} {row.backend:7} {row.op:12} {fmt(row, row.kv):>20} {fmt(row, row.floor):>20}"
            f" {fmt(row, row.floor_crc):>20} {f'{ratio:.2f}' if ratio else '-':>6}"
            f" {f'{ratio_crc:.2f}' if ratio_crc else '-':>6} {f'{cpu:.2f}' if cpu else '-':>8}"
            f" {f'{ref:.3f}' if ref else '':>7}"
        )
    print("\nlatency (median ms) and requests per chunk")
    for row in rows:
        if row.op in ("lookup", "dedup save", "first layer"):
            extra = ""
            if row.op == "first layer":
                total = next(
                    r for r in rows if (r.payload, r.backend, r.op) == (row.payload, row.backend, "load layers")
                )
                extra = f"  ({statistics.median(row.kv) / statistics.median(total.kv):.3f} of the layer-wise load)"
            print(
                f"{row.payload:11} {row.backend:7} {row.op:12} {statistics.median(row.kv) * 1e3:9.1f} ms{extra}"
                f"{'  ' + row.requests if row.requests else ''}"
            )
        elif row.requests:
            print(f"{row.payload:11} {row.backend:7} {row.op:12} {'':12} {row.requests}")
    for row in concurrent:
        serial, together = row.rate(row.floor), row.rate(row.kv)
        assert serial is not None
        assert together is not None
        print(
            f"\nconcurrent loads, {row.backend}: 8 prompts x 128 MiB one after another {serial:.2f} GB/s,"
            f" all at once {together:.2f} GB/s ({together / serial:.2f}x)"
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--payloads", default="large,small-head", help="comma-separated: large, small-head")
    ap.add_argument("--backends", default="memory,local", help="comma-separated: memory, local, s3")
    ap.add_argument("--server", choices=("moto", "rgw"), default="moto", help="the S3 server for --backends s3")
    add_transport_option(ap)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-concurrency", type=int, default=32)
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--no-concurrent", dest="concurrent", action="store_false", help="skip the concurrent-loads run")
    ap.add_argument("--quick", action="store_true", help="an eighth of the tokens: to check that it works")
    ap.add_argument("--dir", default=None, help="parent directory of the local stores (default: /tmp)")
    return ap.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    if os.getloadavg()[0] > 0.5:
        log(f"load average {os.getloadavg()[0]:.2f} before the run: other processes will skew the figures")
    backends = args.backends.split(",")
    rows: list[Row] = []
    concurrent: list[Row] = []
    if "s3" in backends:
        from _s3servers import fresh_store, s3_server  # starts moto or Ceph RGW on 127.0.0.1
    with s3_server(args.server) if "s3" in backends else _nothing() as server:
        for name in args.payloads.split(","):
            p = make_payload(name, args.quick)
            for backend in backends:
                workdir = tempfile.mkdtemp(prefix="kvbench-", dir=args.dir)
                tag = uuid.uuid4().hex[:8]
                bucket_url: dict[str, tuple[str, dict[str, Any]]] = {}

                def where(
                    name: str,
                    backend: str = backend,
                    workdir: str = workdir,
                    tag: str = tag,
                    bucket_url: dict[str, tuple[str, dict[str, Any]]] = bucket_url,
                ) -> tuple[str, Any]:
                    if backend == "local":
                        return os.path.join(workdir, name), None
                    if backend == "memory":
                        return f"memory://kvbench-{tag}/{name}", None
                    if "s3" not in bucket_url:
                        bucket_url["s3"] = fresh_store(server, transport=args.transport)
                    url, so = bucket_url["s3"]
                    return f"{url}/{name}", so

                try:
                    rows += await bench(p, backend, args, where)
                    if args.concurrent and name == "large" and backend != "s3":
                        concurrent.append(await bench_concurrent(backend, args, where))
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                    mem = fsspec.filesystem("memory")
                    if mem.exists(f"/kvbench-{tag}"):
                        mem.rm(f"/kvbench-{tag}", recursive=True)
    report(rows, concurrent, args, f"{server.name} (transport {args.transport})" if server is not None else "-")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> None:
    t0 = time.perf_counter()
    asyncio.run(run(parse_args(argv)))
    print(f"(bench_store took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
