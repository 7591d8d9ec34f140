"""Hugging Face transformers integration: prefill only what the store does not already hold.

    async with kvstore.open("s3://bucket/kv") as store:
        spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="my-llama", version="v1")
        out = await kvstore.hf.generate(store, spec, model, prompt_ids, max_new_tokens=32)

The cycle for one prompt: load its cached prefix (never the last token, whose logits
must be computed), prefill the remaining tokens, generate greedily and save the
extended prefix. The load and the prefill overlap: the model starts once layer 0 is
loaded, and each of its layers waits only for that layer's KV (``load_prefix_layers``
feeding a ``streaming_cache``). The model runs in a worker thread so the event loop
stays free for the store's I/O. Needs the ``hf`` extra (transformers); ``import kvstore``
does not import this module.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import InvalidInputError, StoreUnavailableError
from kvstore.formats.hf import LayerFeed, LayerFeedTimeout, cache_from_kv, kv_from_cache, streaming_cache
from kvstore.formats.keys import TokenInput, normalize_tokens
from kvstore.results import SaveResult
from kvstore.spec import ModelSpec
from kvstore.store import KVStore
from kvstore.writeback import SaveHandle

__all__ = [
    "MIN_CACHED_TOKENS",
    "GenerateResult",
    "PrefillResult",
    "generate",
    "generate_batch",
    "prefill",
    "use_cache_for",
]

logger = logging.getLogger("kvstore.hf")

MIN_CACHED_TOKENS = 64
"""Below this many reusable tokens, recomputing may beat a store round trip.

benchmarks/bench_ttft.py measured the break-even (bf16, 2 CPU cores) at 8 tokens or fewer
from a local directory, and from s3:// on a loopback moto server at about 20 tokens for a
1.24B-parameter model and about 70 for a 317M one; 64 keeps short prompts off slow stores.
Pass ``min_cached_tokens`` to tune it per deployment.
"""


def use_cache_for(num_tokens: int, min_cached_tokens: int = MIN_CACHED_TOKENS) -> bool:
    """Whether a prompt of ``num_tokens`` is long enough for a cache lookup to pay off.

    At most ``num_tokens - 1`` tokens can come from the cache (the last one is
    computed for its logits), so that is what is compared with the threshold.
    """
    return num_tokens - 1 >= max(1, min_cached_tokens)


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """A prompt's prefill: the model cache holding its KV and the next-token logits."""

    cache: Any
    """A transformers ``DynamicCache`` (batch 1) with the KV of every prompt token."""
    logits: torch.Tensor
    """Next-token logits after the prompt, ``[vocab]``."""
    cached_tokens: int
    """Prompt tokens loaded from the store."""
    computed_tokens: int
    """Prompt tokens the model prefilled."""
    ttft_s: float
    """Seconds from the call to the logits (lookup, load and prefill)."""
    saved: SaveResult | SaveHandle | None = None
    """The save of the prompt (a ``SaveHandle`` with ``write_back``; None when off or failed)."""
    cache_error: str | None = None
    """Why the store was skipped (unavailable); the prompt was then computed in full."""


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """One prompt's generation and how much of its prefill the store saved."""

    tokens: list[int]
    """The generated token ids (greedy)."""
    first_logits: torch.Tensor
    """Next-token logits after the prompt, ``[vocab]``."""
    cached_tokens: int
    computed_tokens: int
    ttft_s: float
    total_s: float
    saved: SaveResult | SaveHandle | None
    """The save of the prompt plus generated tokens (a ``SaveHandle`` with ``write_back``; None when off or failed)."""
    cache_error: str | None = None


def _ids(tokens: TokenInput) -> torch.Tensor:
    arr = normalize_tokens(tokens)
    if len(arr) == 0:
        raise InvalidInputError("cannot prefill an empty prompt")
    return torch.from_numpy(arr.astype("int64"))


def _device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")


def _forward_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The cache keyword of this transformers version (5.x: ``cache``; before: ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {"use_cache": True}
    kw["cache" if "cache" in params else "past_key_values"] = cache
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1  # only the last position's logits are needed
    return kw


def _run(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward of ``ids`` (1-D) appending to ``cache`` in place; the last position's logits."""
    with torch.inference_mode():
        out = model(input_ids=ids.unsqueeze(0).to(_device(model)), **_forward_kwargs(model, cache))
    logits: torch.Tensor = out.logits[0, -1]
    return logits


def _decode(model: Any, cache: Any, first: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy tokens from the first logits on; the cache grows by ``max_new_tokens - 1``."""
    tokens = [int(first.argmax())]
    while len(tokens) < max_new_tokens:
        tokens.append(int(_run(model, torch.tensor(tokens[-1:]), cache).argmax()))
    return tokens


def _empty_cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config)


async def prefill(
    store: KVStore | None,
    spec: ModelSpec,
    model: Any,
    tokens: TokenInput,
    *,
    save: bool = False,
    write_back: bool = False,
    min_cached_tokens: int = MIN_CACHED_TOKENS,
) -> PrefillResult:
    """Prefill ``tokens`` (one prompt), loading its longest cached prefix first.

    At most ``len(tokens) - 1`` cached tokens are used; the rest run through ``model``.
    ``store=None`` or a prompt too short for ``use_cache_for`` computes everything.
    ``save`` writes the prompt's KV back (chunks already stored are skipped); with
    ``write_back`` the upload runs in the background (``save_prefix(wait=False)``) and
    ``saved`` is its ``SaveHandle``: errors then come from it or ``store.flush()``. A store
    that is unavailable degrades to a full prefill, logged and reported in ``cache_error``.
    """
    t0 = time.perf_counter()
    ids = _ids(tokens)
    n = len(ids)
    restored, error = None, None
    if store is not None and use_cache_for(n, min_cached_tokens):
        try:
            restored = await _restore(store, spec, model, ids)
        except StoreUnavailableError as exc:
            logger.warning("kvstore unavailable, prefilling %d tokens in full: %s", n, exc)
            error = str(exc)
    if restored is None:
        cache = _empty_cache(getattr(model, "config", None))
        cached, logits = 0, await asyncio.to_thread(_run, model, ids, cache)
    else:
        cached, cache, logits = restored
    ttft = time.perf_counter() - t0
    saved = None
    if save and store is not None and error is None:
        saved, error = await _save(store, spec, ids, cache, write_back)
    return PrefillResult(cache, logits, cached, n - cached, ttft, saved, error)


class _Abandoned(Exception):
    """Wakes a forward waiting for a restored layer that will not come (the load failed or was cut short)."""


async def _restore(store: KVStore, spec: ModelSpec, model: Any, ids: torch.Tensor) -> tuple[int, Any, Any] | None:
    """The prompt's cached prefix and the logits of the rest: ``(cached tokens, cache, logits)``, None on a miss.

    The whole prompt is asked for, so that a saved chunk ending exactly at its end
    still hits; at most ``len(ids) - 1`` tokens are used (the last one's logits must
    be computed). The forward over the remaining tokens starts as soon as layer 0
    is loaded and waits for each later layer as it reaches it, so the load and the
    model's step overlap. A prefetched prompt is taken whole from its prefetch.
    """
    n, dev, config = len(ids), _device(model), getattr(model, "config", None)
    if store.has_prefetch(spec, ids, device=dev):
        hit = await store.load_prefix(spec, ids, device=dev)
        return await _run_after(model, ids, [(k, v) for k, v in hit.kv], hit.num_tokens, config)
    async with store.load_prefix_layers(spec, ids, device=dev) as layers:
        first = await anext(layers, None)
        if first is None:
            return None
        got = [first[1:]]
        cached = min(layers.num_tokens, n - 1)
        streaming = streaming_cache(cached, spec.num_layers, config=config)
        if streaming is None:  # layer types that need the whole prefix up front
            got += [(k, v) async for _, k, v in layers]
            return await _run_after(model, ids, got, layers.num_tokens, config)
        cache, feeds = streaming
        forward = asyncio.ensure_future(asyncio.to_thread(_run, model, ids[cached:], cache))
        filled = 0  # feeds[:filled] have their K/V; the forward may be waiting on feeds[filled]
        try:
            feeds[0].put(first[1][:cached], first[2][:cached])
            filled = 1
            async for layer, k, v in layers:
                got.append((k, v))
                if layer == filled and len(k) >= cached:
                    feeds[layer].put(k[:cached], v[:cached])
                    filled += 1
                else:  # a damaged chunk cut the hit short: this forward cannot finish
                    _abandon(feeds[filled:])
            if filled == len(feeds) and layers.num_tokens >= cached:
                return cached, cache, await forward
        except LayerFeedTimeout:
            logger.warning("the load stalled under a running forward; rerunning over what it restored")
        finally:
            # However the stream ended (short, failed, cancelled), no layer the forward waits for stays unfilled.
            _abandon(feeds[filled:])
            await _settle(forward)  # the worker thread ends before the buffers go
        if len(got) < len(feeds):  # the stream ended early: nothing of the prefix is usable
            return None
        return await _run_after(model, ids, got, layers.num_tokens, config)


def _abandon(feeds: Sequence[LayerFeed]) -> None:
    """Wake a forward waiting on any of ``feeds``: their layers will not come."""
    for feed in feeds:
        feed.fail(_Abandoned())


async def _settle(forward: asyncio.Future[Any]) -> None:
    """Wait for an abandoned forward to end; its error (``_Abandoned``) is expected and dropped."""
    await asyncio.wait([forward])
    if not forward.cancelled():
        forward.exception()


async def _run_after(
    model: Any, ids: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], hit: int, config: Any
) -> tuple[int, Any, Any] | None:
    """Run the tokens after the first ``min(hit, len(ids) - 1)`` over their KV (restored in full)."""
    cached = min(hit, len(ids) - 1)
    if cached <= 0:
        return None
    cache = cache_from_kv([(k[:cached], v[:cached]) for k, v in kv], config=config)
    return cached, cache, await asyncio.to_thread(_run, model, ids[cached:], cache)


async def _save(
    store: KVStore, spec: ModelSpec, ids: torch.Tensor, cache: Any, write_back: bool
) -> tuple[SaveResult | SaveHandle | None, str | None]:
    kv = kv_from_cache(cache, num_tokens=len(ids))
    try:
        if write_back:  # returns once the KV is copied: the caller's decoding may go on at once
            return await store.save_prefix(spec, ids, kv, wait=False), None
        return await store.save_prefix(spec, ids, kv), None
    except StoreUnavailableError as exc:
        logger.warning("kvstore unavailable, KV of %d tokens not saved: %s", len(ids), exc)
        return None, str(exc)


async def generate(
    store: KVStore | None,
    spec: ModelSpec,
    model: Any,
    tokens: TokenInput,
    max_new_tokens: int = 32,
    *,
    save: bool = True,
    write_back: bool = False,
    min_cached_tokens: int = MIN_CACHED_TOKENS,
) -> GenerateResult:
    """Greedy generation for one prompt, reusing and extending the store's cached prefix.

    With ``save``, the KV of the prompt plus all generated tokens but the last (whose
    KV was never computed) is written back, so the next turn of a conversation that
    repeats this one loads it. ``write_back`` uploads it in the background (see ``prefill``).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    t0 = time.perf_counter()
    ids = _ids(tokens)
    pre = await prefill(store, spec, model, ids, min_cached_tokens=min_cached_tokens)
    new = await asyncio.to_thread(_decode, model, pre.cache, pre.logits, max_new_tokens)
    saved, error = None, pre.cache_error
    if save and store is not None and error is None:
        full = torch.cat([ids, torch.tensor(new[:-1], dtype=ids.dtype)])
        saved, error = await _save(store, spec, full, pre.cache, write_back)
    total = time.perf_counter() - t0
    return GenerateResult(new, pre.logits, pre.cached_tokens, pre.computed_tokens, pre.ttft_s, total, saved, error)


async def generate_batch(
    store: KVStore | None,
    spec: ModelSpec,
    model: Any,
    prompts: Sequence[TokenInput] | torch.Tensor,
    max_new_tokens: int = 32,
    *,
    save: bool = True,
    write_back: bool = False,
    min_cached_tokens: int = MIN_CACHED_TOKENS,
) -> list[GenerateResult]:
    """``generate`` for each row of a batch: every row is its own prompt with its own cached prefix.

    Rows run one after another (each has a different cached length); a 2-D tensor's
    rows are taken as they are, without padding.
    """
    rows = list(prompts.unbind(0)) if isinstance(prompts, torch.Tensor) and prompts.dim() == 2 else list(prompts)
    return [
        await generate(
            store,
            spec,
            model,
            row,
            max_new_tokens,
            save=save,
            write_back=write_back,
            min_cached_tokens=min_cached_tokens,
        )
        for row in rows
    ]
