"""The vLLM connector's parts that need no vLLM: settings, identity, paged copies, the scheduler and worker logic.

The scheduler and worker sides run here against a real store (a local directory) with
fake requests, scheduler outputs and paged caches shaped like vLLM's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import kvstore
from kvstore.errors import InvalidInputError
from kvstore.integrations.vllm.config import ConnectorConfig
from kvstore.integrations.vllm.counters import ConnectorCounters
from kvstore.integrations.vllm.identity import RequestVersions, request_version, shard_name, weights_version
from kvstore.integrations.vllm.jobs import LoadJob, SaveJob, StepPlan
from kvstore.integrations.vllm.paged import PagedLayer, UnsupportedLayoutError
from kvstore.integrations.vllm.runtime import StoreRuntime
from kvstore.integrations.vllm.scheduler import SchedulerSide
from kvstore.integrations.vllm.worker import WorkerSide

H, D, BS, CT = 2, 8, 16, 32  # KV heads, head size, vLLM block size, kvstore chunk size
SPEC = kvstore.ModelSpec("tiny", "w1", num_layers=2, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16)
NAMES = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]

# ---------------------------------------------------------------------- settings


def test_config_reads_store_options_and_rejects_typos() -> None:
    cfg = ConnectorConfig.from_extra_config(
        {"url": "s3://b/kv", "storage_options": {"endpoint_url": "http://x"}, "namespace": "t", "model_version": "v9"}
    )
    assert cfg.url == "s3://b/kv"
    assert cfg.open_options == {"storage_options": {"endpoint_url": "http://x"}, "namespace": "t"}
    assert cfg.model_version == "v9"
    access = ConnectorConfig.from_extra_config({"url": "x", "record_access": True, "access_flush_interval": 10})
    assert access.open_options == {"record_access": True, "access_flush_interval": 10}  # JSON's 10.0
    for bad in (
        {},
        {"url": "x", "nmespace": "t"},
        {"url": "x", "verify": 1},
        {"url": "x", "load_timeout_s": -1},
        {"url": "x", "access_flush_interval": "30"},
    ):
        with pytest.raises(InvalidInputError):
            ConnectorConfig.from_extra_config(bad)


# ---------------------------------------------------------------------- identity


def _write_model(path: Path, weights: bytes) -> None:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "model.safetensors").write_bytes(weights)


def test_weights_version_follows_the_weights_and_is_remembered(tmp_path: Path) -> None:
    model, memo = tmp_path / "m", tmp_path / "memo"
    _write_model(model, b"a" * 1000)
    v1 = weights_version(model, cache_dir=memo)
    assert v1.startswith("blake3-")
    assert list(memo.iterdir())  # remembered: an unchanged directory is not hashed again
    assert weights_version(model, cache_dir=memo) == v1
    time.sleep(0.01)
    (model / "model.safetensors").write_bytes(b"b" * 1000)  # same size, new contents
    v2 = weights_version(model, cache_dir=memo)
    assert v2 != v1
    other = tmp_path / "copy"
    _write_model(other, b"b" * 1000)
    assert weights_version(other, cache_dir=memo) == v2  # contents, not paths, name the weights


def test_weights_version_of_a_hub_snapshot_is_its_commit(tmp_path: Path) -> None:
    snap = tmp_path / "models--org--m" / "snapshots" / ("0123456789abcdef" * 3)[:40]
    snap.mkdir(parents=True)
    assert weights_version(snap) == f"rev-{snap.name}"


def test_shards_are_named_apart() -> None:
    assert shard_name("m") == "m"
    names = {shard_name("m", tp_size=4, tp_rank=r) for r in range(4)}
    assert len(names) == 4
    replicated = [shard_name("m", tp_size=8, tp_rank=r, kv_replicas=2) for r in range(8)]
    assert replicated[0] == replicated[1] != replicated[2]  # ranks holding the same heads share keys
    assert shard_name("m", pp_size=2, pp_rank=1) == "m.pp2-1"
    with pytest.raises(ValueError, match="tensor-parallel"):
        shard_name("m", tp_size=4, tp_rank=4)


def test_request_versions_key_lora_and_salt_apart(tmp_path: Path) -> None:
    versions = RequestVersions("w1")
    plain = SimpleNamespace(mm_features=[], prompt_embeds=None, lora_request=None, cache_salt=None)
    assert versions(plain) == "w1"
    salted = versions(SimpleNamespace(**{**vars(plain), "cache_salt": "tenant-a"}))
    assert salted != "w1"
    assert "tenant-a" not in str(salted)
    assert versions(SimpleNamespace(**{**vars(plain), "cache_salt": "tenant-b"})) not in ("w1", salted)
    adapter = tmp_path / "adapter"
    _write_model(adapter, b"lora")
    lora = SimpleNamespace(lora_name="sql", lora_int_id=1, lora_path=str(adapter))
    with_lora = versions(SimpleNamespace(**{**vars(plain), "lora_request": lora}))
    assert with_lora not in ("w1", salted)
    assert with_lora == request_version("w1", lora=f"sql:{weights_version(adapter)}")
    assert versions(SimpleNamespace(**{**vars(plain), "mm_features": ["image"]})) is None


async def test_shards_and_variants_never_hit_each_other(tmp_path: Path) -> None:
    tokens = list(range(64))
    kv = [(torch.ones(64, H, D, dtype=torch.bfloat16), torch.ones(64, H, D, dtype=torch.bfloat16))] * 2
    rank0 = kvstore.ModelSpec(shard_name("m", tp_size=2, tp_rank=0), "w1", 2, H, D, torch.bfloat16)
    rank1 = kvstore.ModelSpec(shard_name("m", tp_size=2, tp_rank=1), "w1", 2, H, D, torch.bfloat16)
    salted = kvstore.ModelSpec(rank0.name, request_version("w1", cache_salt="s"), 2, H, D, torch.bfloat16)
    async with kvstore.open(tmp_path / "kv", chunk_tokens=CT) as store:
        await store.save_prefix(rank0, tokens, kv)
        assert await store.lookup(rank0, tokens) == 64
        assert await store.lookup(rank1, tokens) == 0
        assert await store.lookup(salted, tokens) == 0


# ---------------------------------------------------------------------- paged copies


def _cache(kind: str, blocks: int = 8, device: str = "cpu") -> torch.Tensor:
    shape = {"BHNC": (blocks, H, BS, 2 * D), "2BNHD": (2, blocks, BS, H, D), "B2NHD": (blocks, 2, BS, H, D)}[kind]
    return torch.zeros(shape, dtype=torch.bfloat16, device=device)


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, D, generator=g).bfloat16(), torch.randn(n, H, D, generator=g).bfloat16()


@pytest.mark.parametrize("kind", ["BHNC", "2BNHD", "B2NHD"])
def test_paged_layer_writes_and_reads_rows_in_block_order(kind: str) -> None:
    cache = _cache(kind)
    layer = PagedLayer(cache, num_kv_heads=H, head_size=D, block_size=BS)
    k, v = _rows(3 * BS, 0)
    layer.write([5, 2, 7], k, v)
    got_k, got_v = layer.read([5, 2, 7], 3 * BS - 3)
    assert torch.equal(got_k, k[:-3])
    assert torch.equal(got_v, v[:-3])
    untouched = [b for b in range(8) if b not in (5, 2, 7)]
    assert not layer.k[untouched].any()
    assert not layer.v[untouched].any()
    if kind == "BHNC":  # the CPU backend's page: the block's K rows, then its V rows, per head
        assert torch.equal(cache[5, :, :, :D], k[:BS].transpose(0, 1))
        assert torch.equal(cache[5, :, :, D:], v[:BS].transpose(0, 1))


def test_paged_layer_rejects_other_shapes() -> None:
    with pytest.raises(UnsupportedLayoutError):
        PagedLayer(torch.zeros(4, H, BS, 3 * D), num_kv_heads=H, head_size=D, block_size=BS)
    layer = PagedLayer(_cache("BHNC"), num_kv_heads=H, head_size=D, block_size=BS)
    with pytest.raises(ValueError, match="do not fill"):
        layer.write([1], *_rows(BS - 1, 0))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["BHNC", "2BNHD"])
def test_paged_layer_on_cuda(kind: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layer = PagedLayer(_cache(kind, device="cuda"), num_kv_heads=H, head_size=D, block_size=BS)
    k, v = _rows(2 * BS, 1)
    layer.write([3, 0], k, v)  # CPU rows into a CUDA cache
    got_k, got_v = layer.read([3, 0], 2 * BS)
    assert got_k.is_cuda
    assert torch.equal(got_k.cpu(), k)
    assert torch.equal(got_v.cpu(), v)


# ---------------------------------------------------------------------- scheduler and worker sides


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[StoreRuntime]:
    rt = StoreRuntime(ConnectorConfig(url=str(tmp_path / "kv"), open_options={"chunk_tokens": CT}, min_cached_tokens=8))
    rt.has_worker = True
    deadline = time.monotonic() + 10
    while rt.store() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    yield rt
    rt.close()


def _request(rid: str, tokens: list[int], **extra: Any) -> Any:
    return SimpleNamespace(
        request_id=rid, prompt_token_ids=tokens, mm_features=[], prompt_embeds=None, lora_request=None, **extra
    )


def _scheduler(runtime: StoreRuntime, counters: ConnectorCounters) -> SchedulerSide:
    return SchedulerSide(runtime.config, runtime, [SPEC], BS, counters, RequestVersions(SPEC.version))


def _ask(side: SchedulerSide, request: Any, local: int = 0) -> int:
    """Ask until the lookup is back (the first answers are None: not known yet)."""
    deadline = time.monotonic() + 10
    while (answer := side.matched_tokens(request, local)[0]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return answer


def _save(runtime: StoreRuntime, tokens: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv = [_rows(len(tokens), seed + layer) for layer in range(SPEC.num_layers)]
    store = runtime.store()
    assert store is not None
    runtime.submit(store.save_prefix(SPEC, tokens, kv)).result()
    return kv


def _output(new: list[Any], cached: list[Any] | None = None, scheduled: dict[str, int] | None = None) -> Any:
    cached_reqs = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    for rid, new_ids, computed in cached or []:
        cached_reqs.req_ids.append(rid)
        cached_reqs.new_block_ids.append(new_ids)
        cached_reqs.num_computed_tokens.append(computed)
    return SimpleNamespace(
        scheduled_new_reqs=new, scheduled_cached_reqs=cached_reqs, num_scheduled_tokens=scheduled or {}
    )


def test_scheduler_answers_later_in_whole_blocks_and_never_the_whole_prompt(runtime: StoreRuntime) -> None:
    counters = ConnectorCounters()
    side = _scheduler(runtime, counters)
    prompt = list(range(100, 200))  # 100 tokens: three whole chunks and a tail
    _save(runtime, prompt)
    request = _request("r1", prompt)
    assert side.matched_tokens(request, 0) == (None, False)  # the lookup runs on the store's loop
    assert _ask(side, request) == 96  # 99 usable tokens, floored to blocks of 16
    assert _ask(side, request, local=32) == 64  # only what vLLM's own cache lacks
    longer = _request("r2", [*prompt[:70], *range(900, 930)])
    assert _ask(side, longer) == 64  # two whole chunks of the shared start
    assert _ask(side, _request("r3", list(range(5000, 5100)))) == 0
    assert _ask(side, _request("r4", prompt[:8])) == 0  # below min_cached_tokens: not even looked up
    assert counters.totals().lookups == 3


def test_scheduler_plans_loads_and_saves(runtime: StoreRuntime) -> None:
    side = _scheduler(runtime, ConnectorCounters())
    stored, fresh = list(range(1, 81)), list(range(2000, 2050))
    _save(runtime, stored)
    hit, miss = _request("hit", [*stored, 7, 7, 7]), _request("miss", fresh)
    assert _ask(side, hit) == 80
    assert _ask(side, miss) == 0
    side.after_alloc(hit, 80)
    side.after_alloc(miss, 0)
    new = [
        SimpleNamespace(req_id="hit", block_ids=([9, 8, 7, 6, 5, 4],), num_computed_tokens=80),
        SimpleNamespace(req_id="miss", block_ids=([1, 2],), num_computed_tokens=0),
    ]
    plan = side.plan(_output(new, scheduled={"hit": 3, "miss": 32}))  # the miss is prefilled in two steps
    assert plan.loads == [LoadJob("hit", "w1", stored, 0, 80, [9, 8, 7, 6, 5])]
    assert plan.saves == [SaveJob("hit", "w1", [*stored, 7, 7, 7], [9, 8, 7, 6, 5, 4])]  # the store lacks the end
    plan = side.plan(_output([], cached=[("miss", ([3, 4],), 32)], scheduled={"miss": 18}))
    assert plan.loads == []
    assert plan.saves == [SaveJob("miss", "w1", fresh, [1, 2, 3, 4])]
    assert side.plan(_output([], cached=[("miss", None, 50)], scheduled={"miss": 1})).saves == []  # once


def test_scheduler_treats_an_unreachable_store_as_a_miss(tmp_path: Path) -> None:
    bad = ConnectorConfig(url=str(tmp_path / "none"), open_options={"create": False}, min_cached_tokens=8)
    rt = StoreRuntime(bad)
    counters = ConnectorCounters()
    try:
        side = SchedulerSide(bad, rt, [SPEC], BS, counters, RequestVersions("w1"))
        assert _ask(side, _request("r", list(range(64)))) == 0
        assert counters.totals().lookup_failures == 1
    finally:
        rt.close()


def _worker(runtime: StoreRuntime, counters: ConnectorCounters, blocks: int = 16) -> tuple[WorkerSide, list[Any]]:
    worker = WorkerSide(runtime.config, runtime, SPEC, NAMES, BS, counters)
    caches = {name: _cache("BHNC", blocks) for name in NAMES}
    worker.register(caches)
    return worker, [caches[name] for name in NAMES]


def test_worker_fills_blocks_layer_by_layer_and_saves_what_it_computed(runtime: StoreRuntime) -> None:
    counters = ConnectorCounters()
    worker, caches = _worker(runtime, counters)
    tokens = list(range(300, 364))
    kv = _save(runtime, tokens)
    worker.start(StepPlan(loads=[LoadJob("r", "w1", tokens, 16, 64, [4, 9, 2])]))
    for name in NAMES:
        worker.wait_layer(name)
    worker.finish_step(StepPlan())
    assert worker.take_errors() == set()
    for layer, cache in enumerate(caches):
        pages = PagedLayer(cache, num_kv_heads=H, head_size=D, block_size=BS)
        got_k, got_v = pages.read([4, 9, 2], 48)
        assert torch.equal(got_k, kv[layer][0][16:64])
        assert torch.equal(got_v, kv[layer][1][16:64])
    # The same blocks hold tokens 16..63 of the prompt; with tokens 0..15 in block 11 the whole prompt saves.
    for layer, cache in enumerate(caches):
        PagedLayer(cache, num_kv_heads=H, head_size=D, block_size=BS).write([11], kv[layer][0][:16], kv[layer][1][:16])
    new_prompt = [*tokens, 1, 2, 3]
    for layer, cache in enumerate(caches):
        extra_k, extra_v = _rows(3, 50 + layer)
        k, v = torch.zeros(BS, H, D, dtype=torch.bfloat16), torch.zeros(BS, H, D, dtype=torch.bfloat16)
        k[:3], v[:3] = extra_k, extra_v
        PagedLayer(cache, num_kv_heads=H, head_size=D, block_size=BS).write([13], k, v)
    worker.finish_step(StepPlan(saves=[SaveJob("r", "w2", new_prompt, [11, 4, 9, 2, 13])]))
    worker.barrier()  # the rows are out of the blocks: vLLM may reuse them
    for cache in caches:
        cache.zero_()
    worker.close()  # waits for the upload
    totals = counters.totals()
    assert (totals.loads, totals.saves, totals.save_errors) == (1, 1, 0)
    with kvstore.sync.open(runtime.config.url) as store:
        w2 = kvstore.ModelSpec(SPEC.name, "w2", 2, H, D, torch.bfloat16)
        hit = store.load_prefix(w2, new_prompt)
    assert hit.num_tokens == 67
    assert torch.equal(hit.kv[1][0][:64], kv[1][0])
    assert torch.equal(hit.kv[0][1][64:], _rows(3, 50)[1])


def test_worker_reports_blocks_it_could_not_fill(runtime: StoreRuntime) -> None:
    counters = ConnectorCounters()
    worker, _ = _worker(runtime, counters)
    tokens = list(range(400, 464))
    _save(runtime, tokens[:32])  # the store holds half of what the plan says
    worker.start(StepPlan(loads=[LoadJob("r", "w1", tokens, 0, 64, [1, 2, 3, 4])]))
    for name in NAMES:
        worker.wait_layer(name)
    worker.finish_step(StepPlan())
    assert worker.take_errors() == {3, 4}
    assert worker.take_errors() == set()  # reported once
    worker.start(StepPlan(loads=[LoadJob("s", "w1", tokens[:32], 0, 32, [5, 6])]))
    worker.wait_layer(NAMES[0])  # the forward never waited for layer 1: its blocks are not trusted
    worker.finish_step(StepPlan())
    assert worker.take_errors() == {5, 6}
    totals = counters.totals()
    assert (totals.loads, totals.load_errors, totals.load_error_blocks) == (2, 2, 4)


def test_scheduler_needs_the_hit_in_every_tensor_parallel_shard(runtime: StoreRuntime) -> None:
    shards = [kvstore.ModelSpec(shard_name("m", tp_size=2, tp_rank=r), "w1", 2, H, D, torch.bfloat16) for r in range(2)]
    side = SchedulerSide(runtime.config, runtime, shards, BS, ConnectorCounters(), RequestVersions("w1"))
    store = runtime.store()
    assert store is not None
    prompt = list(range(700, 765))
    kv = [_rows(len(prompt), layer) for layer in range(2)]
    runtime.submit(store.save_prefix(shards[0], prompt, kv)).result()
    assert _ask(side, _request("one-shard", prompt)) == 0  # rank 1 would have nothing to load
    runtime.submit(store.save_prefix(shards[1], prompt[:40], [(k[:40], v[:40]) for k, v in kv])).result()
    assert _ask(side, _request("both", prompt)) == 32  # the shorter shard's hit, in whole blocks
