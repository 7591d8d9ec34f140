"""Loading from S3 with realistic latency: kvstore vs a raw parallel GET floor and a serial loader.

    python benchmarks/bench_s3_latency.py                    # 64 chunks x 32 layers, +20 ms per request
    python benchmarks/bench_s3_latency.py --latency 0.05 --chunks 16

A moto server on 127.0.0.1 serves the bucket; kvstore's fault proxy
(``kvstore.testing.faultproxy``) sits in front of it and adds ``--latency``
seconds to every request. In one run it prints, as medians over ``--reps``:

- kvstore ``load_prefix`` (and, where the store has them, a prefetched load
  and the time to the first layer of ``load_prefix_layers``);
- the floor: a raw parallel GET of the very same data objects (one per chunk)
  through the same proxy with the same concurrency (plain aioboto3, no checks,
  no copies);
- a one-request-at-a-time loader (GET one object after the other), measured
  on ``--serial-chunks`` chunks and scaled to the whole prompt;
- ``save_prefix(wait=False)``'s return and upload times, and the first save (one
  chunk) of a store opened just before: how many round trips of latency a new
  process's first save waits for.

The ratios say how much of the object store's latency kvstore hides. moto
serves only a few hundred requests per second on this machine, which bounds
every parallel figure: the report prints the request rate each one reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from _s3servers import add_transport_option  # benchmarks/ is on sys.path when a script of it runs

import kvstore
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.testing.faultproxy import FaultProxy
from kvstore.testing.s3servers import start_s3_server


def _median(times: list[float]) -> float:
    return statistics.median(times)


async def _timed(fn: Callable[[], Awaitable[Any]], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def run(args: argparse.Namespace) -> None:
    import aioboto3
    import boto3

    stack = contextlib.ExitStack()
    server = stack.enter_context(start_s3_server("moto"))  # in a process of its own, as a real server is
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", **creds).create_bucket(Bucket="bench")
    proxy = FaultProxy(int(port), latency=args.latency).start()
    try:
        spec = kvstore.ModelSpec("bench", "v1", args.layers, args.kv_heads, args.head_dim, torch.float16)
        tokens = list(range(args.chunks * args.chunk_tokens))
        kv = [(torch.randn(len(tokens), args.kv_heads, args.head_dim).half(),) * 2 for _ in range(args.layers)]
        options = {
            "endpoint_url": proxy.url,
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"region_name": "us-east-1"},
            "max_concurrency": 1,
            "transport": args.transport,
        }
        url = "s3://bench/kv"
        nbytes = spec.bytes_per_token * len(tokens)
        objects = args.chunks
        print(
            f"prompt: {args.chunks} chunks of {args.layers} layers = {objects} data objects of "
            f"{nbytes / objects / 2**10:.0f} KiB ({nbytes / 2**20:.0f} MiB); proxy adds {args.latency * 1e3:.0f} ms "
            f"per request; max_concurrency {args.concurrency}"
        )
        async with kvstore.open(
            url, storage_options=options, chunk_tokens=args.chunk_tokens, max_concurrency=args.concurrency
        ) as store:
            t0 = time.perf_counter()
            await store.save_prefix(spec, tokens, kv)
            print(f"save: {time.perf_counter() - t0:.2f} s")

            async def load() -> None:
                hit = await store.load_prefix(spec, tokens)
                assert hit.num_tokens == len(tokens)

            kv_times = await _timed(load, args.reps)
            rows: list[tuple[str, float]] = [("kvstore load_prefix", _median(kv_times))]

            async def first_layer() -> float:
                t = time.perf_counter()
                stream = store.load_prefix_layers(spec, tokens)
                first = 0.0
                async for _layer, _k, _v in stream:
                    if not first:
                        first = time.perf_counter() - t
                return first

            firsts = [await first_layer() for _ in range(args.reps)]
            rows.append(("kvstore first layer", _median(firsts)))

            async def prefetched() -> float:
                handle = store.prefetch(spec, tokens)
                await asyncio.sleep(args.think)  # the engine is busy elsewhere meanwhile
                t = time.perf_counter()
                hit = await store.load_prefix(spec, tokens)
                assert hit.num_tokens == len(tokens)
                del handle
                return time.perf_counter() - t

            waits = [await prefetched() for _ in range(args.reps)]
            rows.append((f"prefetched load (wait after {args.think:.1f} s)", _median(waits)))

            async def background_save(rep: int) -> tuple[float, float]:
                other = [t + (rep + 1) * 10**6 for t in tokens]  # a new prompt: nothing deduplicated
                t = time.perf_counter()
                handle = await store.save_prefix(spec, other, kv, wait=False)
                returned = time.perf_counter() - t
                await handle
                return returned, time.perf_counter() - t

            saves = [await background_save(rep) for rep in range(args.reps)]
            returned, uploaded = _median([r for r, _ in saves]), _median([u for _, u in saves])

        async def first_save(rep: int) -> float:
            """A one-chunk prompt saved by a store opened just before (a new process's first save): its
            setup requests (retirement check, chain HEADs, model record, zarr.json) are round trips too."""
            fresh = f"{url}-fresh-{rep}"
            async with kvstore.open(fresh, storage_options=options, chunk_tokens=args.chunk_tokens) as new:
                t = time.perf_counter()
                await new.save_prefix(spec, tokens[: args.chunk_tokens], [(k[: args.chunk_tokens],) * 2 for k, _ in kv])
                return time.perf_counter() - t

        first_saves = [await first_save(rep) for rep in range(max(args.reps, 5))]

        mid = model_id(spec)
        keys = [
            "kv/" + data_path(mid, k.digest, k.num_tokens)
            for k in chunk_keys(spec, normalize_tokens(tokens), args.chunk_tokens)
        ]
        session = aioboto3.Session(**creds)
        async with session.client("s3", endpoint_url=proxy.url) as client:
            limit = asyncio.Semaphore(args.concurrency)

            async def get(key: str) -> int:
                async with limit:
                    resp = await client.get_object(Bucket="bench", Key=key)
                    return len(await resp["Body"].read())

            async def floor() -> None:
                await asyncio.gather(*(get(k) for k in keys))

            floor_times = await _timed(floor, args.reps)
            serial_keys = keys[: args.serial_chunks]

            async def serial() -> None:
                for key in serial_keys:
                    await get(key)

            serial_time = _median(await _timed(serial, 1)) * len(keys) / len(serial_keys)

        floor_t = _median(floor_times)
        print(f"\n{'measure':44s} {'median s':>9s} {'req/s':>8s} {'vs floor':>9s} {'vs serial':>10s}")
        for name, t in [*rows, ("floor: raw parallel GET (aioboto3)", floor_t)]:
            print(f"{name:44s} {t:9.3f} {objects / t:8.0f} {t / floor_t:8.2f}x {serial_time / t:9.1f}x")
        print(f"{'serial loader (scaled from ' + str(args.serial_chunks) + ' chunks)':44s} {serial_time:9.3f}")
        print(
            f"\nsave_prefix(wait=False): returns in {returned * 1e3:.0f} ms, upload done after {uploaded:.2f} s "
            f"({returned / uploaded:.1%} of it; medians of {args.reps})"
        )
        first = _median(first_saves)
        print(
            f"first save of a new open store (1 chunk): {first * 1e3:.0f} ms, {first / args.latency:.1f}x the"
            f" added latency (median of {len(first_saves)})"
        )
        print(f"proxy: {proxy.stats.requests} requests")
    finally:
        proxy.stop()
        stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.020, help="seconds added to every request")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--serial-chunks", type=int, default=2)
    parser.add_argument("--think", type=float, default=1.0, help="seconds between prefetch and load")
    add_transport_option(parser)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
