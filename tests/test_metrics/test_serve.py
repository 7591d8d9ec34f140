"""``kvstore.metrics.serve``: scraped over HTTP on 127.0.0.1 and parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from _scrape import samples, value
from prometheus_client import CollectorRegistry, Counter

import kvstore
import kvstore.metrics

SPEC = kvstore.ModelSpec("metrics", "v1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
KV = [(torch.zeros(40, 2, 8, dtype=torch.float16),) * 2 for _ in range(2)]


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


async def test_serve_on_a_free_port_then_stop(tmp_path: Path) -> None:
    async with kvstore.open(str(tmp_path / "kv"), chunk_tokens=16) as store:
        await store.save_prefix(SPEC, list(range(40)), KV)
        server = kvstore.metrics.serve(store, port=0)
        try:
            assert server.host == "127.0.0.1"
            assert server.port > 0
            content_type, text = await asyncio.to_thread(_get, server.url)
            assert content_type.startswith("text/plain")
            assert value(samples(text), "kvstore_calls_total", call="save") == 1
            await store.load_prefix(SPEC, list(range(40)))
            _, text = await asyncio.to_thread(_get, server.url)  # every scrape reads the store afresh
            assert value(samples(text), "kvstore_load_tokens_total", result="hit") == 40
        finally:
            server.close()
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(_get, server.url)
        server.close()  # idempotent


def test_serve_a_sync_store_beside_metrics_of_your_own(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    mine = Counter("app_requests", "Requests of the application.", registry=registry)
    mine.inc(3)
    with kvstore.sync.open(tmp_path / "kv", chunk_tokens=16) as store:
        store.save_prefix(SPEC, list(range(40)), KV)
        with kvstore.metrics.serve(store, 0, registry=registry) as server:
            s = samples(_get(server.url)[1])
            with pytest.raises(ValueError, match="Duplicated"):  # one store's collector per registry
                kvstore.metrics.serve(store, 0, registry=registry)
        assert value(s, "app_requests_total") == 3
        assert value(s, "kvstore_chunks_written_total") == 3
        with kvstore.metrics.serve(store, 0, registry=registry) as server:  # close() took the collector out
            assert value(samples(_get(server.url)[1]), "kvstore_calls_total", call="save") == 1
