"""The fan-out listing covers exactly what one listing of chunks/ returns, and a resumed run plans again the
partitions its interrupted run finished."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from gc_helpers import put_raw

import kvstore
from kvstore.formats.keys import model_id
from kvstore.formats.layout import array_prefix, data_path
from kvstore.gc.bulk import (
    SPLIT_MIN,
    BulkOps,
    Partition,
    list_fanned_out,
    list_partition,
    open_bulk_ops,
    plan_partitions,
)
from kvstore.storage import ObjectMeta, open_object_store

CHUNK = 4


async def _listed(bulk: BulkOps, plan: list[Partition]) -> list[tuple[str, int]]:
    return [(m.key, m.size) for part in plan async for m in list_partition(bulk, part)]


def _check_partitions(plan: list[Partition], parts: list[list[ObjectMeta]]) -> None:
    assert len({p.name for p in plan}) == len(plan)
    for part, objects in zip(plan, parts, strict=True):
        assert all(m.key.startswith(part.prefix) for m in objects)
        if not part.deep:
            assert all("/" not in m.key[len(part.prefix) :] for m in objects)


@pytest.mark.parametrize("split_min", [1, SPLIT_MIN])
@pytest.mark.parametrize("backend", ["memory", "local", "moto"])
async def test_fan_out_lists_exactly_the_objects_of_one_listing(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any], split_min: int
) -> None:
    url, opts = store_url
    specs = [make_spec(version="v1"), make_spec(version="v2")]
    prompt = list(range(4 * 40 + 2))  # 40 chunks and a tail per model: most key prefixes hold one chunk
    for spec in specs:
        async with kvstore.open(url, storage_options=opts, chunk_tokens=CHUNK) as store:
            await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))
    mid = model_id(specs[0])
    array = array_prefix(mid, CHUNK)
    odd = {
        "chunks/loose-object": b"1",  # directly under chunks/
        f"chunks/{mid.hex()}/loose": b"2",  # directly under a model
        f"chunks/{mid.hex()}/zz/not-a-chunk/x": b"3",  # a sub-prefix outside the layout
        f"{array}c/1/x": b"4",  # off the shard's chain of an array
        f"{array}c/0/0/0/0/0/loose": b"5",  # beside an array's key prefixes
        "chunks/not-a-model/ab/cd/k/zarr.json": b"6",
        data_path(model_id(specs[1]), b"\x42" * 32, CHUNK) + ".tmp-" + "0a" * 16: b"7",  # a crashed writer
        "models/not-listed.msgpack": b"8",  # outside chunks/
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
            assert len(one) > 2 * 40
            assert {k for k, _ in one} >= set(odd) - {"models/not-listed.msgpack"}
            _check_partitions(plan, parts)
            if backend.url.startswith("memory"):
                assert plan == [Partition("chunks/")]  # no delimiter listing there: one stream
            elif split_min == 1:  # every model is split: its arrays into key prefixes, its tail markers likewise
                assert bulk.fan_out > 1
                m = f"chunks/{mid.hex()}/"
                for shallow in ("chunks/", m, array, f"{array}c/0/0/0/0/0/"):
                    assert Partition(shallow, deep=False) in plan
                assert Partition(f"{m}zz/") in plan
                assert Partition(f"{array}c/1/") in plan
                assert Partition(f"{m}tails/") not in plan
                assert sum(p.prefix.startswith(f"{array}c/0/0/0/0/0/") and p.deep for p in plan) > 20
                assert sum(p.prefix.startswith(f"{m}tails/") for p in plan) == 1  # one marker: one <aa>/
                assert len(plan) > 40
            else:  # small models are listed whole, one partition each
                models = {f"chunks/{model_id(s).hex()}/" for s in specs} | {"chunks/not-a-model/"}
                assert plan == [Partition("chunks/", deep=False), *(Partition(p) for p in sorted(models))]
    finally:
        await backend.close()


@pytest.mark.parametrize("backend", ["local", "moto"])
async def test_a_resumed_plan_holds_the_finished_partitions_whatever_the_samples_say(
    store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    url, opts = store_url
    spec = make_spec()
    prompt = list(range(4 * 40 + 2))
    async with kvstore.open(url, storage_options=opts, chunk_tokens=CHUNK) as store:
        await store.save_prefix(spec, prompt, make_kv(spec, len(prompt)))
    backend = await open_object_store(url, opts)
    try:
        async with open_bulk_ops(backend, url, opts, split_min=0) as bulk:
            one = sorted([(m.key, m.size) async for m in bulk.list_objects("chunks/")])
            split = await plan_partitions(bulk, "chunks/")
        done = {p.name for p in split[::3]}
        finished = [p for p in split if p.name in done]
        assert any(not p.deep for p in finished)
        async with open_bulk_ops(backend, url, opts) as bulk:  # its samples alone would not split the model
            assert await plan_partitions(bulk, "chunks/") == [Partition(f"chunks/{model_id(spec).hex()}/")]
            resumed = await plan_partitions(bulk, "chunks/", done=done)
            assert done <= {p.name for p in resumed}
            rest = [p for p in resumed if p.name not in done]
            listed = await _listed(bulk, finished) + await _listed(bulk, rest)
            assert sorted(listed) == one
    finally:
        await backend.close()
