"""GPU staging: host<->device copy bandwidth from the pinned pool, and ``load_prefix(..., device="cuda")``.

    python benchmarks/bench_gpu.py            # 256 MiB copies; a 512 MiB prompt (32 x 8 x 128, bf16, 4096 tokens)
    python benchmarks/bench_gpu.py --quick    # 64 MiB copies, a 32 MiB prompt, 3 reps

Copies (GB/s, median of the reps, min-max in brackets), each measured in the
same run:

- host->device: torch's pageable ``.to("cuda")``; the pinned peak (a
  ``torch.empty(pin_memory=True)`` tensor copied with ``non_blocking=True``);
  kvstore's staging from its pinned pool, through cupy and through the
  torch-only fallback. Each is reported as a ratio of the pinned peak.
- device->host: the same three, the staging path being ``Transfers.to_host``.

End to end, from a local directory (objects in the page cache): ``load_prefix``
onto the CPU; onto CUDA through the staging; and the CPU load followed by a
plain ``.to("cuda")`` of every tensor (what a caller does without staging).

Without a CUDA device it prints "no CUDA device: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

import kvstore
from kvstore.gpu import Stagings
from kvstore.gpu.cupy_engine import load_cupy
from kvstore.store import KVStore

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _fmt_rate(nbytes: int, times: list[float]) -> str:
    rates = [nbytes / t / 1e9 for t in times]
    return f"{statistics.median(rates):6.2f} GB/s [{min(rates):.2f}-{max(rates):.2f}]"


def _fmt_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:8.1f} ms [{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}]"


async def _timed(reps: int, step: Callable[[], Awaitable[None]]) -> list[float]:
    await step()  # warm-up: allocators, pinned pool, streams
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await step()
        times.append(time.perf_counter() - t0)
    return times


def _backends() -> dict[str, Stagings]:
    found = {"torch fallback": Stagings(2 << 30, load_cupy=lambda: None)}
    if load_cupy() is not None:
        found = {"cupy": Stagings(2 << 30), **found}
    return found


async def bench_copies(args: argparse.Namespace, device: torch.device) -> None:
    n = args.copy_mib << 20
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(src)
    on_device = src.to(device)
    stream = torch.cuda.current_stream(device)

    async def h2d_pageable() -> None:
        src.to(device)
        stream.synchronize()

    async def h2d_pinned() -> None:
        torch.empty(n, dtype=torch.uint8, device=device).copy_(pinned, non_blocking=True)
        stream.synchronize()

    async def d2h_pageable() -> None:
        on_device.to("cpu")

    async def d2h_pinned() -> None:
        pinned.copy_(on_device, non_blocking=True)
        stream.synchronize()

    rows: dict[str, dict[str, list[float]]] = {
        "host->device": {
            "pageable .to(cuda)": await _timed(args.reps, h2d_pageable),
            "pinned peak": await _timed(args.reps, h2d_pinned),
        },
        "device->host": {
            "pageable .to(cpu)": await _timed(args.reps, d2h_pageable),
            "pinned peak": await _timed(args.reps, d2h_pinned),
        },
    }
    for name, stagings in _backends().items():
        staging = stagings.for_device(device)

        async def h2d_pool(staging: kvstore.gpu.Staging = staging) -> None:
            async with staging.transfers() as transfers:
                host = transfers.host_empty((n,), torch.uint8)
                transfers.to_device([host])
                stream.synchronize()

        async def d2h_pool(staging: kvstore.gpu.Staging = staging) -> None:
            async with staging.transfers() as transfers:
                await transfers.to_host([(on_device, on_device[:0])])

        rows["host->device"][f"pinned pool ({name})"] = await _timed(args.reps, h2d_pool)
        rows["device->host"][f"pinned pool ({name})"] = await _timed(args.reps, d2h_pool)

    print(f"copies of {args.copy_mib} MiB, {args.reps} reps, {torch.cuda.get_device_name(device)}")
    for direction, results in rows.items():
        peak = statistics.median(results["pinned peak"])
        for label, times in results.items():
            print(f"  {direction} {label:28s} {_fmt_rate(n, times)}   {peak / statistics.median(times):5.2f}x of peak")


async def bench_load(args: argparse.Namespace, root: Path, device: torch.device) -> None:
    dtype = DTYPES[args.dtype]
    spec = kvstore.ModelSpec("bench-gpu", "v1", args.layers, args.kv_heads, args.head_dim, dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128_000, (args.tokens,), generator=gen).tolist()
    shape = (args.tokens, args.kv_heads, args.head_dim)
    kv = [
        (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        for _ in range(args.layers)
    ]
    nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
    async with kvstore.open(root, chunk_tokens=args.chunk_tokens) as store:
        await store.save_prefix(spec, tokens, kv)
    del kv

    async def load(store: KVStore, where: torch.device | str) -> None:
        hit = await store.load_prefix(spec, tokens, device=where)
        assert hit.num_tokens == len(tokens)
        torch.cuda.current_stream(device).synchronize()

    async def load_then_copy(store: KVStore) -> None:
        hit = await store.load_prefix(spec, tokens)
        assert hit.num_tokens == len(tokens)
        [(k.to(device), v.to(device)) for k, v in hit.kv]
        torch.cuda.current_stream(device).synchronize()

    results: dict[str, list[float]] = {}
    async with kvstore.open(root) as store:
        results["load_prefix(device='cpu')"] = await _timed(args.reps, lambda: load(store, "cpu"))
        results["cpu load, then .to(cuda)"] = await _timed(args.reps, lambda: load_then_copy(store))
    for name, stagings in _backends().items():
        async with kvstore.open(root) as store:
            store._stagings = stagings
            results[f"load_prefix(device='cuda'), {name}"] = await _timed(args.reps, lambda: load(store, device))

    chunks = -(-args.tokens // args.chunk_tokens)
    print(
        f"load_prefix from a local directory: {args.layers} layers x {args.kv_heads} heads x {args.head_dim}, "
        f"{args.dtype}, {args.tokens} tokens = {nbytes / 2**20:.0f} MiB in {chunks} chunks; {args.reps} reps"
    )
    cpu = statistics.median(results["load_prefix(device='cpu')"])
    for label, times in results.items():
        print(
            f"  {label:40s} {_fmt_ms(times)}   {_fmt_rate(nbytes, times)}   {statistics.median(times) / cpu:5.2f}x cpu"
        )


async def run(args: argparse.Namespace, root: Path) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    await bench_copies(args, device)
    await bench_load(args, root, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-mib", type=int, default=256, help="size of each copy benchmarked")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="parent of the temporary store (default: the system temp dir)")
    parser.add_argument("--quick", action="store_true", help="64 MiB copies, a 32 MiB prompt and 3 reps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        sys.exit(0)
    if args.quick:
        args.copy_mib, args.tokens, args.reps = 64, 256, 3
    tmp = Path(tempfile.mkdtemp(prefix="kvbench-gpu-", dir=args.dir))
    try:
        asyncio.run(run(args, tmp / "kv"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
