"""Layout conversion between a Hugging Face transformers KV cache and kvstore's per-layer (K, V).

transformers keeps each layer as ``[batch, kv_heads, seq, head_dim]``; kvstore stores
``[tokens, kv_heads, head_dim]`` for one prompt. Both directions here return *views*
(a transpose and a slice), so the only copy is the one the store makes anyway when it
lays the tensors out contiguously for saving, or the one the model makes when it
appends new tokens to a restored cache. ``streaming_cache`` builds a cache whose layers
are filled while the model already runs (each layer waits for its own KV).

transformers is imported only when a cache is built (the ``hf`` extra), never by
``import kvstore``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cache as _once
from typing import Any, Protocol

import torch

from kvstore.errors import InvalidInputError
from kvstore.results import LayerKV

__all__ = [
    "FEED_TIMEOUT_S",
    "LayerFeed",
    "LayerFeedTimeout",
    "cache_from_kv",
    "cache_layers",
    "kv_from_cache",
    "streaming_cache",
]

FEED_TIMEOUT_S = 300.0
"""How long a forward waits for one layer of a ``streaming_cache`` before it gives up.

A backstop, not the normal way out: the producer fails every layer it will not
fill as soon as it knows (``kvstore.hf`` does, whenever its load ends short, fails
or is cancelled). The timeout bounds a producer that stalls or stops without a word,
so a forward thread never waits forever.
"""


class LayerFeedTimeout(TimeoutError):
    """A forward waited longer than its ``streaming_cache``'s timeout for a layer's restored K/V."""


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
    plain, _ = _layer_types()
    cache: Any = _empty(config)
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


class LayerFeed(Protocol):
    """One layer of a ``streaming_cache``: give it its restored K/V, or the reason it will not come."""

    def put(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """This layer's first tokens, ``[tokens, heads, head_dim]`` (views are kept, not copied)."""
        ...

    def fail(self, exc: BaseException) -> None:
        """Make the forward that waits for this layer raise ``exc`` instead."""
        ...


def streaming_cache(
    num_tokens: int, num_layers: int, *, config: Any = None, timeout: float = FEED_TIMEOUT_S
) -> tuple[Any, list[LayerFeed]] | None:
    """A batch-1 ``DynamicCache`` whose first ``num_tokens`` arrive layer by layer while a forward runs.

    The model can start on the tokens after the restored prefix at once, in
    another thread: layer ``i``'s attention waits until ``feeds[i].put(k, v)``
    (from the loader) has given that layer's K/V, so the forward overlaps the
    rest of the load. A layer neither given nor failed within ``timeout`` seconds
    of the forward reaching it makes the forward raise ``LayerFeedTimeout``.
    None when the model has layers other than plain full-attention ones (their
    caches need the whole prefix up front): use ``cache_from_kv`` then.
    """
    plain, streamed = _layer_types()
    cache: Any = _empty(config)
    if config is None:
        cache.layers.extend(plain() for _ in range(num_layers))
    if len(cache.layers) != num_layers or any(type(layer) is not plain for layer in cache.layers):
        return None
    if not timeout > 0:
        raise InvalidInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    cache.layers = [streamed(num_tokens, timeout) for _ in range(num_layers)]
    return cache, list(cache.layers)


def _empty(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config) if config is not None else DynamicCache()


@_once
def _layer_types() -> tuple[Any, Any]:
    """transformers' ``DynamicLayer`` and its streamed variant (made once, on first use: transformers is optional)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("kvstore's transformers integration needs transformers: pip install 'kvstore[hf]'") from exc

    class StreamedLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers is not typed
        """A ``DynamicLayer`` whose restored prefix is set by ``put`` from another thread before its first update."""

        def __init__(self, num_tokens: int, timeout: float) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self._num_tokens = num_tokens
            self._timeout = timeout
            self._ready = threading.Event()
            self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
            self._error: BaseException | None = None

        def put(self, k: torch.Tensor, v: torch.Tensor) -> None:
            self._kv = (k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0))
            self._ready.set()

        def fail(self, exc: BaseException) -> None:
            self._error = exc
            self._ready.set()

        def get_seq_length(self) -> int:  # asked before any layer runs (positions, masks)
            return self._num_tokens if not self.is_initialized else int(super().get_seq_length())

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                if not self._ready.wait(self._timeout):
                    raise LayerFeedTimeout(f"no restored K/V for this layer within {self._timeout} s")
                if self._error is not None:
                    raise self._error
                assert self._kv is not None
                kb, vb = self._kv
                self.lazy_initialization(kb, vb)
                self.keys, self.values = kb, vb
            return super().update(key_states, value_states, *args, **kwargs)

    return DynamicLayer, StreamedLayer
