"""Repeat one kvstore operation in a loop, for a sampling profiler to look at.

    python benchmarks/profile_store.py --op load --backend local --iters 10
    python benchmarks/profile_store.py --op load --spy load.txt    # py-spy over the timed loop only
    python benchmarks/profile_store.py --op save --pyinstrument      # event-loop thread only

py-spy sees every thread (the worker threads do the copying and hashing);
pyinstrument sees only the event-loop thread. ``benchmarks/collapse.py``
summarizes py-spy's raw output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import fsspec
import torch

import kvstore

GB = 1e9
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def evict(root: str) -> None:
    """Drop every file under ``root`` from the page cache (DONTNEED skips dirty pages, so sync first)."""
    os.sync()
    for directory, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


async def run(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    spec = kvstore.ModelSpec("profile-model", "v1", args.layers, args.kv_heads, args.head_dim, dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (args.tokens, args.kv_heads, args.head_dim)
    kv = [
        (torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype))
        for _ in range(args.layers)
    ]
    tokens = list(range(args.tokens))
    nbytes = spec.bytes_per_token * args.tokens
    workdir = tempfile.mkdtemp(prefix="kvprofile-", dir=args.dir or "/tmp")
    tag = uuid.uuid4().hex[:8]
    opts = {"codec": args.codec, "verify": args.verify, "max_concurrency": args.max_concurrency}

    def url(i: int) -> str:
        return f"memory://kvprofile-{tag}/{i}" if args.backend == "memory" else os.path.join(workdir, str(i))

    def remove(i: int) -> None:
        if args.backend == "memory":
            fsspec.filesystem("memory").rm(f"/kvprofile-{tag}/{i}", recursive=True)
        else:
            shutil.rmtree(url(i), ignore_errors=True)

    spy: subprocess.Popen[bytes] | None = None

    async def start_spy() -> None:
        nonlocal spy
        if args.spy:
            cmd = [args.py_spy, "record", "--threads", "-r", str(args.rate), "-f", "raw", "-o", args.spy]
            spy = subprocess.Popen([*cmd, "--pid", str(os.getpid())], stderr=subprocess.DEVNULL)  # noqa: ASYNC220
            await asyncio.sleep(1.0)  # let py-spy attach

    try:
        if args.op == "save":
            async with kvstore.open(url(0), **opts) as store:  # warm-up, not profiled
                await store.save_prefix(spec, tokens, kv)
            remove(0)
            await start_spy()
            for i in range(1, args.iters + 1):
                async with kvstore.open(url(i), **opts) as store:
                    t0 = time.perf_counter()
                    await store.save_prefix(spec, tokens, kv)
                    dt = time.perf_counter() - t0
                if args.backend == "local":
                    os.sync()
                remove(i)
                print(f"save {i}: {nbytes / dt / GB:.2f} GB/s", flush=True)
        else:
            async with kvstore.open(url(0), **opts) as store:
                await store.save_prefix(spec, tokens, kv)
                hit = await store.load_prefix(spec, tokens)  # warm-up, not profiled
                del hit
                await start_spy()
                for i in range(args.iters):
                    if args.cold:
                        evict(url(0))
                    t0 = time.perf_counter()
                    hit = await store.load_prefix(spec, tokens)
                    dt = time.perf_counter() - t0
                    del hit
                    print(f"load {i}: {nbytes / dt / GB:.2f} GB/s", flush=True)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait)
        shutil.rmtree(workdir, ignore_errors=True)
        if args.backend == "memory":
            fs = fsspec.filesystem("memory")
            if fs.exists(f"/kvprofile-{tag}"):
                fs.rm(f"/kvprofile-{tag}", recursive=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=["save", "load"], default="load")
    p.add_argument("--backend", choices=["memory", "local"], default="local")
    p.add_argument("--cold", action="store_true", help="evict the store from the page cache before each load")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--codec", default="none")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--dir", default=None)
    p.add_argument("--spy", default=None, help="record the timed loop with py-spy (raw format) into this file")
    p.add_argument("--py-spy", default=os.path.join(os.path.dirname(sys.executable), "py-spy"))
    p.add_argument("--rate", type=int, default=67, help="py-spy samples per second (2 cores: keep it low)")
    p.add_argument("--pyinstrument", action="store_true", help="profile the event-loop thread with pyinstrument")
    args = p.parse_args()
    if args.pyinstrument:
        from pyinstrument import Profiler

        with Profiler(async_mode="enabled") as profiler:
            asyncio.run(run(args))
        profiler.print(show_all=False)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
