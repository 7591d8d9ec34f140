"""Layout conversion between transformers caches and kvstore (K, V), and specs from configs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

import kvstore
from kvstore.formats.hf import LayerFeedTimeout, cache_from_kv, cache_layers, kv_from_cache, streaming_cache
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path, parse_chunk_object
from kvstore.formats.shard import parse_head

transformers = pytest.importorskip("transformers")

import _models  # noqa: E402

import kvstore.hf  # noqa: E402


def _layers(batch: int = 2, heads: int = 2, seq: int = 5, dim: int = 4, n: int = 3) -> list[tuple[torch.Tensor, ...]]:
    return [(torch.randn(batch, heads, seq, dim), torch.randn(batch, heads, seq, dim)) for _ in range(n)]


def test_kv_from_cache_is_a_view_of_one_row() -> None:
    legacy = _layers()
    cache = transformers.DynamicCache(ddp_cache_data=legacy)
    for source in (
        cache,
        tuple(legacy),
        SimpleNamespace(key_cache=[k for k, _ in legacy], value_cache=[v for _, v in legacy]),
    ):
        kv = kv_from_cache(source, row=1, num_tokens=4)
        assert len(kv) == 3
        for (k, v), (lk, lv) in zip(kv, cache_layers(source), strict=True):
            assert k.shape == (4, 2, 4)
            assert torch.equal(k, lk[1, :, :4].transpose(0, 1))
            assert torch.equal(v, lv[1, :, :4].transpose(0, 1))
            assert k.untyped_storage().data_ptr() == lk.untyped_storage().data_ptr()  # no copy


def test_cache_from_kv_round_trips_without_copy() -> None:
    kv = [(torch.randn(6, 2, 4), torch.randn(6, 2, 4)) for _ in range(3)]
    for config in (None, _models.build("llama").config):
        cache = cache_from_kv(kv, config=config)
        assert cache.get_seq_length() == 6
        back = kv_from_cache(cache)
        for (k, v), (bk, bv) in zip(kv, back, strict=True):
            assert torch.equal(k, bk)
            assert torch.equal(v, bv)
            assert bk.data_ptr() == k.data_ptr()


def test_bad_caches_are_rejected() -> None:
    with pytest.raises(kvstore.InvalidInputError):
        kv_from_cache(object())
    with pytest.raises(kvstore.InvalidInputError):
        kv_from_cache([(torch.zeros(2, 3), torch.zeros(2, 3))])
    with pytest.raises(kvstore.InvalidInputError):
        kv_from_cache(_layers(), row=2)
    with pytest.raises(kvstore.InvalidInputError):
        kv_from_cache(_layers(), num_tokens=6)
    with pytest.raises(kvstore.InvalidInputError):
        cache_from_kv([(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))], config=_models.build("llama").config)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            transformers.LlamaConfig(num_hidden_layers=5, hidden_size=256, num_attention_heads=8, dtype="bfloat16"),
            (5, 8, 32, torch.bfloat16),
        ),
        (
            transformers.Qwen2Config(
                num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, dtype=torch.float16
            ),
            (4, 2, 32, torch.float16),
        ),
        (
            transformers.LlamaConfig(
                num_hidden_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=48,
                dtype="float32",
            ),
            (2, 1, 48, torch.float32),
        ),
    ],
)
def test_spec_from_pretrained_config(config: Any, expected: tuple[Any, ...]) -> None:
    spec = kvstore.ModelSpec.from_pretrained_config(config, name="m", version="1")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == expected


def test_spec_dtype_given_or_missing() -> None:
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    config.dtype = None
    with pytest.raises(kvstore.InvalidInputError, match="dtype"):
        kvstore.ModelSpec.from_pretrained_config(config, name="m", version="1")
    spec = kvstore.ModelSpec.from_pretrained_config(config, name="m", version="1", dtype=torch.bfloat16)
    assert spec.dtype == torch.bfloat16


def test_use_cache_for_threshold() -> None:
    assert not kvstore.hf.use_cache_for(1, 0)  # the last token is always computed
    assert kvstore.hf.use_cache_for(2, 0)
    assert not kvstore.hf.use_cache_for(kvstore.hf.MIN_CACHED_TOKENS)
    assert kvstore.hf.use_cache_for(kvstore.hf.MIN_CACHED_TOKENS + 1)


async def test_batch_rows_are_separate_prompts() -> None:
    model = _models.build("qwen2")
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="q", version="1")
    prompts = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    async with kvstore.open("memory://hf-batch", chunk_tokens=8) as store:
        await kvstore.hf.prefill(store, spec, model, prompts[0], save=True, min_cached_tokens=0)
        out = await kvstore.hf.generate_batch(store, spec, model, prompts, 3, min_cached_tokens=0)
    assert [r.cached_tokens for r in out] == [19, 0]
    for row, res in zip(prompts, out, strict=True):
        ref = await kvstore.hf.generate(None, spec, model, row, 3)
        assert res.tokens == ref.tokens


async def test_write_back_saves_in_the_background_and_the_next_turn_hits() -> None:
    model = _models.build("llama")
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="wb", version="1")
    prompt = list(range(3, 43))
    async with kvstore.open("memory://hf-write-back", chunk_tokens=8) as store:
        first = await kvstore.hf.generate(store, spec, model, prompt, 4, write_back=True, min_cached_tokens=0)
        assert isinstance(first.saved, kvstore.SaveHandle)
        # read-your-writes: the next turn hits whether or not the upload has finished
        turn2 = [*prompt, *first.tokens, 7, 8, 9]
        second = await kvstore.hf.generate(store, spec, model, turn2, 2, save=False, min_cached_tokens=0)
        assert second.cached_tokens == len(prompt) + 3  # the prompt and the generated tokens whose KV exists
        saved = await first.saved
        assert saved.num_tokens == len(prompt) + 3
        await store.flush()
    ref = await kvstore.hf.generate(None, spec, model, turn2, 2)
    assert second.tokens == ref.tokens


def _before_reads(store: kvstore.KVStore, before: Callable[[str, int], Awaitable[None]]) -> None:
    """Run ``before(key, start)`` ahead of every read of the store's backend (``start``: its first byte).

    It may wait or raise. A load that streams layers reads each chunk's data
    object in two ranges: layer 0 (with the header) from byte 0, the rest after it.
    """
    backend: Any = store._backend
    get, get_range, get_range_into = backend.get, backend.get_range, backend.get_range_into

    async def whole(key: str) -> bytes:
        await before(key, 0)
        return cast(bytes, await get(key))

    async def ranged(key: str, start: int, end: int) -> bytes:
        await before(key, start)
        return cast(bytes, await get_range(key, start, end))

    async def into(key: str, start: int, buffers: Any, *, then: Any = None) -> int:
        await before(key, start)
        return cast(int, await get_range_into(key, start, buffers, then=then))

    backend.get, backend.get_range, backend.get_range_into = whole, ranged, into


def _fail_later_layer_reads(store: kvstore.KVStore, error: Exception) -> None:
    """Make every read of a chunk's layers after layer 0 raise ``error`` (layer 0 reads normally)."""

    async def fail(key: str, start: int) -> None:
        parsed = parse_chunk_object(key)
        if parsed is not None and parsed.kind == "data" and start > 0:
            raise error

    _before_reads(store, fail)


async def _saved_store(url: str, model: Any, spec: kvstore.ModelSpec, prompt: list[int]) -> kvstore.KVStore:
    store = await kvstore.open(url, chunk_tokens=8)
    await kvstore.hf.prefill(store, spec, model, prompt, save=True, min_cached_tokens=0)
    return store


async def test_a_streamed_hit_equals_the_whole_load_and_a_recompute() -> None:
    model = _models.build("llama")
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="s", version="1")
    prompt = list(range(3, 43))
    store = await _saved_store("memory://hf-streamed", model, spec, prompt)
    async with store:
        streamed = await kvstore.hf.prefill(store, spec, model, prompt, min_cached_tokens=0)
        store.prefetch(spec, prompt)  # a prefetched prompt is restored whole, then run
        assert store.has_prefetch(spec, prompt)
        whole = await kvstore.hf.prefill(store, spec, model, prompt, min_cached_tokens=0)
        assert not store.has_prefetch(spec, prompt)
    full = await kvstore.hf.prefill(None, spec, model, prompt)
    assert streamed.cached_tokens == whole.cached_tokens == len(prompt) - 1
    assert torch.equal(streamed.logits, whole.logits)
    assert (streamed.logits - full.logits).abs().max() <= 1e-4
    assert [layer.keys.shape[2] for layer in streamed.cache.layers] == [len(prompt)] * 3


def _data_object(spec: kvstore.ModelSpec, prompt: list[int], chunk: int) -> str:
    """The stored path of ``chunk``'s data object (chunks of 8 tokens)."""
    key = chunk_keys(spec, normalize_tokens(prompt), 8)[chunk]
    return data_path(model_id(spec), key.digest, key.num_tokens)


async def _damage_layer(store: kvstore.KVStore, path: str, num_layers: int, layer: int) -> None:
    """Flip a byte of ``layer``'s stored bytes in the data object at ``path``: its checksum finds it."""
    backend: Any = store._backend
    data = bytearray(await backend.get(path))
    span = parse_head(data, num_layers, len(data)).spans[layer]
    data[span.offset + span.nbytes // 2] ^= 0xFF
    await backend.put(path, bytes(data))


def _gate_later_layers(store: kvstore.KVStore, path: str, gate: asyncio.Event) -> None:
    """Hold every read of the layers after layer 0 in the data object at ``path`` until ``gate`` is set."""

    async def wait(key: str, start: int) -> None:
        if key == path and start > 0:
            await gate.wait()

    _before_reads(store, wait)


@pytest.mark.parametrize(("chunk", "expected"), [(0, 0), (2, 16)])
async def test_damage_found_after_layer_0_was_handed_to_the_model(
    monkeypatch: pytest.MonkeyPatch, chunk: int, expected: int
) -> None:
    """Layer 0 reaches the running forward, then the read of ``chunk``'s later layers finds layer 2 damaged.

    Damage of chunk 0 ends the stream early (nothing usable): every layer the
    forward still waits for must be failed, or it waits forever. Damage of a later
    chunk cuts the hit: the prompt reruns over the shorter prefix.
    """
    model = _models.build("qwen2")
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="d", version="1")
    prompt = list(range(3, 43))
    store = await _saved_store(f"memory://hf-damage-{chunk}", model, spec, prompt)
    damaged = _data_object(spec, prompt, chunk)
    await _damage_layer(store, damaged, spec.num_layers, 2)  # a flipped byte at rest in layer 2
    gate, feeds = asyncio.Event(), []
    streaming = kvstore.hf.streaming_cache

    def spying(*args: Any, **kwargs: Any) -> Any:  # layer 0 handed to the forward opens the gate
        made = streaming(*args, **kwargs)
        assert made is not None
        feeds.extend(made[1])
        put = made[1][0].put

        def put_and_open(k: torch.Tensor, v: torch.Tensor) -> None:
            put(k, v)
            gate.set()

        made[1][0].put = put_and_open
        return made

    monkeypatch.setattr(kvstore.hf, "streaming_cache", spying)
    _gate_later_layers(store, damaged, gate)
    async with store:
        try:
            out = await asyncio.wait_for(kvstore.hf.prefill(store, spec, model, prompt, min_cached_tokens=0), 20)
        finally:
            for feed in feeds:  # a hung forward thread (the defect) is released, so the test fails, not hangs
                feed.fail(RuntimeError("test over"))
    assert gate.is_set()
    assert (out.cached_tokens, out.cache_error) == (expected, None)
    assert store.stats().chunks_damaged == 1
    full = await kvstore.hf.prefill(None, spec, model, prompt)
    assert (out.logits - full.logits).abs().max() <= 1e-4


async def test_a_forward_never_waits_for_a_layer_without_bound() -> None:
    """A producer that stalls without failing its feeds costs the forward its timeout, not forever."""
    model = _models.build("llama")
    made = streaming_cache(4, 3, config=model.config, timeout=0.2)
    assert made is not None
    cache, feeds = made
    feeds[0].put(torch.zeros(4, 2, 16), torch.zeros(4, 2, 16))  # layer 1 never comes
    with pytest.raises(LayerFeedTimeout):
        await asyncio.wait_for(asyncio.to_thread(kvstore.hf._run, model, torch.tensor([5, 6]), cache), 20)


async def test_a_store_failing_mid_stream_degrades_to_a_full_prefill(caplog: pytest.LogCaptureFixture) -> None:
    model = _models.build("llama")
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="l", version="1")
    prompt = list(range(3, 23))
    store = await _saved_store("memory://hf-down", model, spec, prompt)
    async with store:
        _fail_later_layer_reads(store, kvstore.StoreUnavailableError("down"))
        out = await kvstore.hf.generate(store, spec, model, prompt, 2, min_cached_tokens=0)
    assert (out.cached_tokens, out.computed_tokens, out.saved, out.cache_error) == (0, 20, None, "down")
    assert "unavailable" in caplog.text
    assert out.tokens == (await kvstore.hf.generate(None, spec, model, prompt, 2)).tokens


def test_formats_hf_does_not_import_transformers() -> None:
    code = "import sys, kvstore.formats.hf, kvstore.spec; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_spec_from_a_plain_config_object() -> None:
    # transformers 4.x style: torch_dtype, no head_dim, no num_key_value_heads, no get_text_config.
    old = SimpleNamespace(num_hidden_layers=3, num_attention_heads=6, hidden_size=384, torch_dtype="float16")
    spec = kvstore.ModelSpec.from_pretrained_config(old, name="m", version="1")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (3, 6, 64, torch.float16)
    with pytest.raises(kvstore.InvalidInputError):
        kvstore.ModelSpec.from_pretrained_config(SimpleNamespace(dtype="float32"), name="m", version="1")
