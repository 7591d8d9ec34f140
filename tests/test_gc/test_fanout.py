"""The fan-out listing covers exactly what one listing of chunks/ returns, each chunk's objects together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from gc_helpers import put_raw

import kvstore
from kvstore.formats.keys import model_id
from kvstore.formats.layout import chunk_prefix
from kvstore.gc.bulk import SPLIT_MIN, Partition, list_fanned_out, open_bulk_ops, plan_partitions
from kvstore.storage import open_object_store

CHUNK = 4


@pytest.mark.parametrize("split_min", [1, SPLIT_MIN])
@pytest.mark.parametrize("backend", ["memory", "local", "moto"])
async def test_fan_out_lists_exactly_the_objects_of_one_listing(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], split_min: int
) -> None:
    url, opts = store_url
    specs = [make_spec(version="v1"), make_spec(version="v2")]
    prompt = list(range(4 * 40 + 2))  # 40 chunks and a tail per model: most fan-out prefixes hold one chunk
    for spec in specs:
        async with kvstore.open(url, storage_options=opts, chunk_tokens=CHUNK) as store:
            await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))
    mid = model_id(specs[0]).hex()
    odd = {
        "chunks/loose-object": b"1",  # directly under chunks/
        f"chunks/{mid}/loose": b"2",  # directly under a model
        f"chunks/{mid}/zz/not-a-chunk/x": b"3",  # a fan-out prefix outside the hex shape
        "chunks/not-a-model/ab/cd/k/zarr.json": b"4",
        chunk_prefix(model_id(specs[1]), b"\x42" * 32) + "c.0.0.0.0.0.tmp-0123abcd": b"5",  # a crashed writer
        "models/not-listed.msgpack": b"6",  # outside chunks/
    }
    await put_raw(url, opts, odd)
    backend = await open_object_store(url, opts)
    try:
        async with open_bulk_ops(backend, url, opts, split_min=split_min) as bulk:
            one = [(m.key, m.size) async for m in bulk.list_objects("chunks/")]
            plan = await plan_partitions(bulk, "chunks/")
            parts = await list_fanned_out(bulk, "chunks/")
            fanned = [(m.key, m.size) for part in parts for m in part]
            assert len(fanned) == len(set(fanned))  # nothing listed twice
            assert sorted(fanned) == sorted(one)
            assert len(one) > 2 * 2 * 40
            assert {k for k, _ in one} >= set(odd) - {"models/not-listed.msgpack"}
            if backend.url.startswith("memory"):
                assert plan == [Partition("chunks/")]  # no delimiter listing there: one stream
            elif split_min == 1:  # every model is split into its fan-out prefixes
                assert bulk.fan_out > 1
                assert Partition("chunks/", deep=False) in plan
                assert Partition(f"chunks/{mid}/", deep=False) in plan
                assert Partition(f"chunks/{mid}/zz/") in plan
                assert len(plan) > 40
            else:  # small models are listed whole, one partition each
                models = {f"chunks/{model_id(s).hex()}/" for s in specs} | {"chunks/not-a-model/"}
                assert plan == [Partition("chunks/", deep=False), *(Partition(p) for p in sorted(models))]
            for part, objects in zip(plan, parts, strict=True):
                assert all(m.key.startswith(part.prefix) for m in objects)
                if not part.deep:
                    assert all("/" not in m.key[len(part.prefix) :] for m in objects)
                chunks = [m.key.split("/")[4] for m in objects if m.key.count("/") >= 5]
                runs = [c for i, c in enumerate(chunks) if i == 0 or chunks[i - 1] != c]
                assert len(runs) == len(set(runs)), f"a chunk's objects are split in {part.prefix}"
    finally:
        await backend.close()
