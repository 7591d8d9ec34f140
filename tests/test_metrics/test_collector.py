"""StoreCollector over a real store (a local directory, S3 on moto and on Ceph RGW): the scrape tells what happened.

Every expected figure is worked out from the scenario (prompt lengths, chunk
size, the one damaged chunk), and the request counters are checked against
the requests the store itself counted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _scrape import exposition, samples, value

import kvstore
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.metrics import StoreCollector
from kvstore.storage import open_object_store
from kvstore.storage.instrumented import LATENCY_BUCKETS, OPERATIONS

CT = 16
SPEC = kvstore.ModelSpec("metrics", "v1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def _kv(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 8, generator=gen).half(), torch.randn(n, 2, 8, generator=gen).half()) for _ in range(2)]


async def _damage_chunk(url: str, options: dict[str, Any] | None, tokens: list[int], chunk: int) -> None:
    """Flip a bit of the chunk's last layer (the end of its data object): its checksum no longer matches."""
    key = chunk_keys(SPEC, normalize_tokens(tokens), CT)[chunk]
    path = data_path(model_id(SPEC), key.digest, key.num_tokens)
    raw = await open_object_store(url, options)
    try:
        data = bytearray(await raw.get(path))
        data[-1] ^= 0x40
        await raw.put(path, bytes(data))
    finally:
        await raw.close()


REQUEST_KINDS = {
    "get": ("get", "get_range"),
    "put": ("put",),
    "head": ("head",),
    "list": ("list",),
    "delete": ("delete",),
}


@pytest.mark.parametrize("backend", ["local", "moto", "rgw"])  # the S3 servers of conftest.S3_SERVERS
async def test_a_scrape_reports_saves_hits_misses_and_damage(store_url: tuple[str, dict[str, Any] | None]) -> None:
    url, options = store_url
    a, b, c = list(range(40)), list(range(1000, 1040)), list(range(2000, 2048))
    async with kvstore.open(url, storage_options=options, chunk_tokens=CT) as store:
        collector = StoreCollector(store)
        before = samples(exposition(collector))
        stats_before = store.stats()

        await store.save_prefix(SPEC, a, _kv(40, 1))
        await store.save_prefix(SPEC, a, _kv(40, 1))  # every chunk there already
        await store.save_prefix(SPEC, c, _kv(48, 3))
        assert (await store.load_prefix(SPEC, a)).num_tokens == 40
        assert (await store.load_prefix(SPEC, b)).num_tokens == 0
        assert (await store.load_prefix(SPEC, [*a, *range(5000, 5020)])).num_tokens == 40
        assert await store.lookup(SPEC, a) == 40
        await _damage_chunk(url, options, c, chunk=1)
        damaged = await store.load_prefix(SPEC, c)
        assert (damaged.num_tokens, damaged.chunks_damaged) == (CT, 1)

        s = samples(exposition(collector))
        stats_after = store.stats()

    queries = [(40, 40), (40, 0), (60, 40), (48, CT)]  # (tokens asked, tokens hit) per load
    assert value(s, "kvstore_calls_total", call="save") == 3
    assert value(s, "kvstore_calls_total", call="load") == 4
    assert value(s, "kvstore_calls_total", call="lookup") == 1
    hit_tokens = sum(hit for _, hit in queries)
    assert value(s, "kvstore_load_tokens_total", result="hit") == hit_tokens
    assert value(s, "kvstore_load_tokens_total", result="miss") == sum(n for n, _ in queries) - hit_tokens
    hit_chunks = sum(math.ceil(hit / CT) for _, hit in queries)
    assert value(s, "kvstore_load_chunks_total", result="hit") == hit_chunks
    assert (
        value(s, "kvstore_load_chunks_total", result="miss") == sum(math.ceil(n / CT) for n, _ in queries) - hit_chunks
    )
    assert value(s, "kvstore_chunks_written_total") == 3 + 3
    assert value(s, "kvstore_chunks_deduplicated_total") == 3
    assert value(s, "kvstore_damaged_chunks_total") == 1
    assert value(s, "kvstore_chunk_bytes_total", direction="write") == stats_after.bytes_written > 0
    assert value(s, "kvstore_chunk_bytes_total", direction="read") == stats_after.bytes_read > 0

    # The instrumented layer saw exactly the requests the store issued (no retries without faults).
    for kind, ops in REQUEST_KINDS.items():
        issued = getattr(stats_after, f"requests_{kind}") - getattr(stats_before, f"requests_{kind}")
        seen = sum(
            value(s, "kvstore_requests_total", operation=op) - value(before, "kvstore_requests_total", operation=op)
            for op in ops
        )
        assert seen == issued, kind
    assert value(s, "kvstore_requests_total", operation="delete") >= 1  # the damaged chunk, deleted by repair
    assert value(s, "kvstore_request_retries_total") == 0
    assert value(s, "kvstore_object_bytes_total", tier="source", direction="write") >= stats_after.bytes_written
    assert value(s, "kvstore_object_bytes_total", tier="source", direction="read") >= stats_after.bytes_read

    for op in OPERATIONS:
        buckets = [
            value(s, "kvstore_request_duration_seconds_bucket", operation=op, le=repr(b)) for b in LATENCY_BUCKETS
        ]
        total = value(s, "kvstore_request_duration_seconds_bucket", operation=op, le="+Inf")
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] <= total
        assert total == value(s, "kvstore_request_duration_seconds_count", operation=op)
        assert total == value(s, "kvstore_requests_total", operation=op) - value(
            s, "kvstore_requests_cancelled_total", operation=op
        )
    assert value(s, "kvstore_request_duration_seconds_sum", operation="put") > 0


async def test_cache_tiers_report_reads_per_tier(tmp_path: Path) -> None:
    async with kvstore.open(str(tmp_path / "kv"), chunk_tokens=CT, memory_cache_bytes=1 << 20) as store:
        await store.save_prefix(SPEC, list(range(32)), _kv(32, 1))
        for _ in range(2):
            assert (await store.load_prefix(SPEC, list(range(32)))).num_tokens == 32
        s = samples(exposition(StoreCollector(store)))
        stats = store.stats()
    assert value(s, "kvstore_tier_reads_total", tier="memory") == stats.memory_hits > 0
    assert value(s, "kvstore_object_bytes_total", tier="memory", direction="read") == stats.memory_bytes > 0
    assert value(s, "kvstore_tier_reads_total", tier="source") == stats.source_reads > 0
    async with kvstore.open(str(tmp_path / "kv2"), chunk_tokens=CT) as plain:
        await plain.save_prefix(SPEC, list(range(32)), _kv(32, 1))
        await plain.load_prefix(SPEC, list(range(32)))
        s = samples(exposition(StoreCollector(plain)))
    assert value(s, "kvstore_tier_reads_total", tier="memory") == 0
    assert value(s, "kvstore_tier_reads_total", tier="source") == 0
    assert value(s, "kvstore_object_bytes_total", tier="source", direction="read") > 0
