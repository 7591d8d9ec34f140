"""Time to the first layer of ``load_prefix_layers`` against the full load, on a local directory.

    python benchmarks/bench_layers.py                  # 32 layers x 8 heads x 128, bf16, 4096 tokens = 512 MiB
    python benchmarks/bench_layers.py --quick          # 32 MiB, to check that it works
    python benchmarks/bench_layers.py --latency-ms 20  # every GET held 20 ms first (an object store's round trip)

For every repetition (median, min-max in brackets) it measures, each on a fresh
call: ``load_prefix`` end to end; the time from calling ``load_prefix_layers``
to its first layer; and the time to its last layer. It prints the first layer
as a fraction of the full load: the part of the load an engine still waits for
before layer 0's compute can start. Objects are in the page cache (warm).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import kvstore
from kvstore.storage import LocalObjectStore, ObjectMeta, ObjectStore

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DelayedStore(ObjectStore):
    """Holds every read ``delay`` seconds before serving it: a round trip's latency, without its bandwidth."""

    def __init__(self, inner: ObjectStore, delay: float) -> None:
        self.inner = inner
        self.url = inner.url
        self.reads_into_buffers = inner.reads_into_buffers
        self.delay = delay

    async def get(self, key: str) -> bytes:
        await asyncio.sleep(self.delay)
        return await self.inner.get(key)

    async def get_into(
        self, key: str, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        await asyncio.sleep(self.delay)
        return await self.inner.get_into(key, buffers, then=then)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        return await self.inner.put(key, data, create_only=create_only)

    async def head(self, key: str) -> ObjectMeta | None:
        await asyncio.sleep(self.delay)
        return await self.inner.head(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        await asyncio.sleep(self.delay)
        async for meta in self.inner.list(prefix):
            yield meta

    async def delete(self, keys: Sequence[str]) -> None:
        await self.inner.delete(keys)

    async def close(self) -> None:
        await self.inner.close()


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:8.1f} ms [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}]"


async def run(args: argparse.Namespace, root: Path) -> None:
    dtype = DTYPES[args.dtype]
    spec = kvstore.ModelSpec("bench-layers", "v1", args.layers, args.kv_heads, args.head_dim, dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128_000, (args.tokens,), generator=gen).numpy().astype(np.int64)
    shape = (args.tokens, args.kv_heads, args.head_dim)
    kv = [
        (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        for _ in range(args.layers)
    ]
    nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
    async with kvstore.open(root, chunk_tokens=args.chunk_tokens, codec=args.codec) as store:
        await store.save_prefix(spec, tokens, kv)
    del kv

    backend: ObjectStore = LocalObjectStore(root)
    if args.latency_ms:
        backend = DelayedStore(backend, args.latency_ms / 1e3)
    options = kvstore.StoreOptions(
        chunk_tokens=args.chunk_tokens, codec=args.codec, max_concurrency=args.max_concurrency
    )
    store = kvstore.KVStore(backend, options)
    full: list[float] = []
    first: list[float] = []
    last: list[float] = []
    try:
        await store.load_prefix(spec, tokens)  # warm-up: page cache, allocator, thread pool
        for _ in range(args.reps):
            t0 = time.perf_counter()
            hit = await store.load_prefix(spec, tokens)
            full.append(time.perf_counter() - t0)
            assert hit.num_tokens == len(tokens)
            del hit
            t0 = time.perf_counter()
            t_first = 0.0
            async with store.load_prefix_layers(spec, tokens) as layers:
                async for layer, _, _ in layers:
                    if layer == 0:
                        t_first = time.perf_counter() - t0
            last.append(time.perf_counter() - t0)
            first.append(t_first)
    finally:
        await store.close()

    chunks = -(-args.tokens // args.chunk_tokens)
    print(
        f"{args.layers} layers x {args.kv_heads} heads x {args.head_dim}, {args.dtype}, {args.tokens} tokens = "
        f"{nbytes / 2**20:.0f} MiB; {chunks} chunks x {args.layers} layer objects; codec {args.codec}; "
        f"max_concurrency {args.max_concurrency}; added latency per read {args.latency_ms} ms; {args.reps} reps"
    )
    print(f"load_prefix (full)          {_fmt(full)}   {nbytes / statistics.median(full) / 1e9:.2f} GB/s")
    print(f"load_prefix_layers: layer 0 {_fmt(first)}")
    print(f"load_prefix_layers: all     {_fmt(last)}")
    ratio = statistics.median(first) / statistics.median(full)
    print(f"time to first layer / full load = {ratio:.3f}  (ideal ~ 1/{args.layers} = {1 / args.layers:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--codec", default="none")
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="parent of the temporary store (default: the system temp dir)")
    parser.add_argument("--quick", action="store_true", help="a 32 MiB prompt and 3 reps")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.reps = 256, 3
    tmp = Path(tempfile.mkdtemp(prefix="kvbench-layers-", dir=args.dir))
    try:
        asyncio.run(run(args, tmp / "kv"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
