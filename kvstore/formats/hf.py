"""Layout conversion between a Hugging Face transformers KV cache and kvstore's per-layer (K, V).

transformers keeps each layer as ``[batch, kv_heads, seq, head_dim]``; kvstore stores
``[tokens, kv_heads, head_dim]`` for one prompt. Both directions here return *views*
(a transpose and a slice), so the only copy is the one the store makes anyway when it
lays the tensors out contiguously for saving, or the one the model makes when it
appends new tokens to a restored cache.

transformers is imported only when a cache is built (the ``hf`` extra), never by
``import kvstore``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvstore.errors import InvalidInputError
from kvstore.results import LayerKV

__all__ = ["cache_from_kv", "cache_layers", "kv_from_cache"]


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(K, V)`` of ``[batch, heads, seq, head_dim]`` from any transformers cache form.

    Accepts a transformers 5.x cache (``cache.layers[i].keys`` / ``.values``), a 4.x
    ``DynamicCache`` (``key_cache`` / ``value_cache`` lists) and the legacy tuple of
    per-layer ``(K, V)`` tuples.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    elif hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    elif isinstance(cache, Sequence) and not isinstance(cache, (str, bytes, torch.Tensor)):
        pairs = []
        for layer in cache:
            if not isinstance(layer, Sequence) or len(layer) < 2:
                raise InvalidInputError("a legacy cache must be a sequence of per-layer (K, V) tuples")
            pairs.append((layer[0], layer[1]))
    else:
        raise InvalidInputError(f"not a transformers KV cache: {type(cache).__name__}")
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, (k, v) in enumerate(pairs):
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise InvalidInputError(f"cache layer {i} holds no tensors (was the model run with use_cache=True?)")
        if k.dim() != 4 or k.shape != v.shape:
            raise InvalidInputError(
                f"cache layer {i}: expected K and V of equal shape [batch, heads, seq, head_dim], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        out.append((k, v))
    if not out:
        raise InvalidInputError("the cache has no layers")
    return out


def kv_from_cache(cache: Any, *, row: int = 0, num_tokens: int | None = None) -> list[LayerKV]:
    """kvstore's ``[tokens, heads, head_dim]`` (K, V) per layer for one batch ``row``, as views.

    ``num_tokens`` keeps only the first tokens (e.g. the prompt, without generated
    tokens). No data is copied: ``store.save_prefix`` makes the one contiguous copy.
    """
    layers = cache_layers(cache)
    batch, _, seq, _ = layers[0][0].shape
    if not -batch <= row < batch:
        raise InvalidInputError(f"row {row} is outside the cache's batch of {batch}")
    n = seq if num_tokens is None else num_tokens
    if not 0 <= n <= seq:
        raise InvalidInputError(f"num_tokens {num_tokens} is outside the cache's {seq} tokens")
    return [(k[row, :, :n].transpose(0, 1), v[row, :, :n].transpose(0, 1)) for k, v in layers]


def cache_from_kv(kv: Sequence[LayerKV], *, config: Any = None) -> Any:
    """A transformers ``DynamicCache`` for batch 1 holding ``kv`` (``[tokens, heads, head_dim]`` per layer).

    The layers hold views of ``kv`` (no copy): the model's first forward concatenates
    the new tokens onto them, which is the only copy. Pass the model's ``config`` so
    the cache gets the model's layer types; plain full-attention layers take the views
    directly, any other layer type is filled through its own ``update``.
    """
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("kvstore's transformers integration needs transformers: pip install 'kvstore[hf]'") from exc

    plain: Any = DynamicLayer  # transformers leaves its constructor unannotated
    cache: Any = DynamicCache(config=config) if config is not None else DynamicCache()
    if config is None:
        cache.layers.extend(plain() for _ in kv)
    if len(cache.layers) != len(kv):
        raise InvalidInputError(f"kv has {len(kv)} layers, the model's cache has {len(cache.layers)}")
    for i, (layer, (k, v)) in enumerate(zip(cache.layers, kv, strict=True)):
        if k.dim() != 3 or k.shape != v.shape:
            raise InvalidInputError(f"kv[{i}]: expected K and V of equal shape [tokens, heads, head_dim]")
        kb, vb = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        if type(layer) is plain:
            layer.lazy_initialization(kb, vb)
            layer.keys, layer.values = kb, vb
        else:
            layer.update(kb, vb)
    return cache
