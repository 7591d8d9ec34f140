"""Soak (opt-in: ``pytest -m slow``): writers, readers and a GC against S3 through a faulty proxy.

Runs ``KVSTORE_SOAK_SECONDS`` (default 60) of random 503s, 500s, resets and
truncated bodies on a share of all requests, and prints the counts. Every load
must be bit-exact (or a shorter hit), and every save that returned must load in
full once the faults stop.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import kvstore
from kvstore import gc as kvgc
from kvstore.testing.faultproxy import Fault, FaultProxy

CHUNK = 16
PROMPTS = 6


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as p:
        yield p


def _kv_of(tokens: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A function of (position, token): equal prefixes have equal KV, as with a real model."""
    t = torch.tensor(tokens, dtype=torch.float64)[:, None, None]
    p = torch.arange(len(tokens), dtype=torch.float64)[:, None, None]
    e = torch.arange(16, dtype=torch.float64).reshape(1, 2, 8)
    return [
        (torch.sin(t * 0.013 + p * 0.37 + e + i).half(), torch.cos(t * 0.011 + p * 0.29 + e + i).half())
        for i in range(layers)
    ]


@pytest.mark.slow
@pytest.mark.s3
async def test_soak_mixed_faults_no_wrong_load_no_lost_prefix(
    proxy: FaultProxy, s3_store_url: Any, make_spec: Callable[..., Any]
) -> None:
    seconds = float(os.environ.get("KVSTORE_SOAK_SECONDS", "60"))
    spec = make_spec(dtype=torch.float16)
    bases = [[1000 * b + i for i in range(64)] for b in range(PROMPTS)]
    options = {
        **s3_store_url.storage_options,
        "endpoint_url": proxy.url,
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "read_timeout": 5},
    }
    policy = kvstore.RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.2, request_timeout=5, breaker_threshold=0)
    counts = {"saves": 0, "failed_saves": 0, "loads": 0, "wrong_loads": 0, "short_loads": 0, "gc_runs": 0}
    saved: set[tuple[int, int]] = set()
    deadline = time.monotonic() + seconds
    async with kvstore.open(s3_store_url.url, storage_options=options, chunk_tokens=CHUNK, retry=policy) as store:
        proxy.random_faults = (Fault("status", 503), Fault("status", 500), Fault("reset"), Fault("truncate"))
        proxy.fault_rate = 0.05

        async def writer(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                b, n = rng.randrange(PROMPTS), rng.randrange(1, 65)
                tokens = bases[b][:n]
                try:
                    await store.save_prefix(spec, tokens, _kv_of(tokens))
                except kvstore.StoreUnavailableError:
                    counts["failed_saves"] += 1  # fails closed: a clear error, nothing half-visible
                else:
                    counts["saves"] += 1
                    saved.add((b, n))

        async def reader(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                b, n = rng.randrange(PROMPTS), rng.randrange(1, 65)
                tokens = bases[b][:n]
                hit = await store.load_prefix(spec, tokens, timeout=10)
                counts["loads"] += 1
                expected = _kv_of(tokens[: hit.num_tokens]) if hit.num_tokens else None
                if expected is not None and not all(
                    torch.equal(k, ek) and torch.equal(v, ev) for (k, v), (ek, ev) in zip(hit.kv, expected, strict=True)
                ):
                    counts["wrong_loads"] += 1
                if hit.num_tokens < n and (b, n) in saved:
                    counts["short_loads"] += 1  # a fault during the load: a shorter hit, never wrong data

        async def collector() -> None:
            while time.monotonic() < deadline:
                report = await kvgc.run_gc(
                    s3_store_url.url, storage_options=s3_store_url.storage_options, grace=5, allow_short_grace=True
                )
                counts["gc_runs"] += report.ok
                await asyncio.sleep(1)

        await asyncio.gather(writer(1), writer(2), reader(3), reader(4), collector())
        proxy.clear()
        faults = sum(proxy.stats.faults.values())
        lost = 0
        for b, n in sorted(saved):
            hit = await store.load_prefix(spec, bases[b][:n])
            lost += hit.num_tokens != n
    print(
        f"\nsoak {seconds:.0f} s: {counts}, requests {proxy.stats.requests}, faults injected {faults} "
        f"{dict(proxy.stats.faults)}, lost committed prefixes {lost}"
    )
    assert counts["wrong_loads"] == 0
    assert lost == 0
    assert faults > 0
    assert counts["saves"] > 0
    assert counts["loads"] > 0
