"""Synchronous facade for callers without an event loop: same names, blocking calls.

store = kvstore.sync.open("/tmp/kv")
store.save_prefix(spec, tokens, kv)
hit = store.load_prefix(spec, tokens)
store.close()
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Final, TypeVar, Unpack

import torch

from kvstore._loop import LoopThread
from kvstore.formats.keys import TokenInput
from kvstore.loading import LayerStream
from kvstore.opening import OpenOptions
from kvstore.opening import open as open_async
from kvstore.prefetch import PrefetchHandle
from kvstore.results import LayerKV, LoadResult, ModelInfo, RequestStats, SaveResult, StoreStats
from kvstore.spec import ModelSpec
from kvstore.store import KVStore, StoreOptions

__all__ = ["NOT_MIRRORED", "SyncPrefetchHandle", "SyncStore", "open"]

T = TypeVar("T")

NOT_MIRRORED: Final[Mapping[str, str]] = {
    "save_prefix(wait=)": "a SaveHandle is awaited on the loop thread: use save_prefix_background, then flush()",
}
"""What of ``KVStore``'s public API ``SyncStore`` does not mirror, and why (a test keeps this complete)."""


class SyncStore:
    """Blocking wrapper of a KVStore whose event loop runs in a private thread."""

    def __init__(self, store: KVStore, loop: LoopThread) -> None:
        self._store = store
        self._loop = loop

    @property
    def url(self) -> str:
        return self._store.url

    @property
    def chunk_tokens(self) -> int:
        return self._store.chunk_tokens

    @property
    def options(self) -> StoreOptions:
        return self._store.options

    def save_prefix(self, spec: ModelSpec, tokens: TokenInput, kv: Sequence[LayerKV]) -> SaveResult:
        return self._loop.run(self._store.save_prefix(spec, tokens, kv))

    def save_prefix_background(self, spec: ModelSpec, tokens: TokenInput, kv: Sequence[LayerKV]) -> None:
        """``save_prefix(..., wait=False)``: returns once the KV is copied; errors come from ``flush()``."""
        self._loop.run(self._store.save_prefix(spec, tokens, kv, wait=False))

    def flush(self) -> None:
        self._loop.run(self._store.flush())

    def load_prefix(
        self,
        spec: ModelSpec,
        tokens: TokenInput,
        *,
        device: torch.device | str = "cpu",
        timeout: float | None = None,
    ) -> LoadResult:
        return self._loop.run(self._store.load_prefix(spec, tokens, device=device, timeout=timeout))

    def load_prefix_layers(
        self, spec: ModelSpec, tokens: TokenInput, *, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Layers in order as each completes; requests stay in flight on the loop thread between steps.

        Leaving the loop early (or closing the generator) cancels the outstanding requests.
        """
        stream = self._store.load_prefix_layers(spec, tokens, device=device)
        return self._iterate(stream)

    def _iterate(self, stream: LayerStream) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        try:
            while (item := self._loop.run(_next(stream))) is not None:
                yield item
        finally:
            self._loop.run(stream.aclose())

    def prefetch(
        self, spec: ModelSpec, tokens: TokenInput, *, device: torch.device | str = "cpu"
    ) -> SyncPrefetchHandle:
        """Start loading in the background (on the loop thread); the next ``load_prefix`` of these tokens joins it."""
        handle = self._loop.run(_call(lambda: self._store.prefetch(spec, tokens, device=device)))
        return SyncPrefetchHandle(handle, self._loop)

    def has_prefetch(self, spec: ModelSpec, tokens: TokenInput, *, device: torch.device | str = "cpu") -> bool:
        return self._loop.run(_call(lambda: self._store.has_prefetch(spec, tokens, device=device)))

    def lookup(self, spec: ModelSpec, tokens: TokenInput) -> int:
        return self._loop.run(self._store.lookup(spec, tokens))

    def models(self) -> list[ModelInfo]:
        return self._loop.run(self._store.models())

    def retire(self, name: str, version: str, *, by: str | None = None, reason: str | None = None) -> list[ModelInfo]:
        return self._loop.run(self._store.retire(name, version, by=by, reason=reason))

    def stats(self) -> StoreStats:
        return self._store.stats()

    def request_stats(self) -> RequestStats:
        return self._store.request_stats()

    def close(self) -> None:
        try:
            self._loop.run(self._store.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> SyncStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncPrefetchHandle:
    """A prefetch started by ``SyncStore.prefetch``: ``result()`` blocks for its ``LoadResult``.

    The prefetch runs on the store's loop thread whether or not anyone waits;
    ``result()`` raises ``concurrent.futures.CancelledError`` for a dropped one.
    """

    def __init__(self, handle: PrefetchHandle, loop: LoopThread) -> None:
        self._handle = handle
        self._loop = loop

    @property
    def chunks_done(self) -> int:
        return self._handle.chunks_done

    @property
    def bytes_done(self) -> int:
        return self._handle.bytes_done

    def done(self) -> bool:
        return self._handle.done()

    def cancel(self) -> bool:
        return self._loop.run(_call(self._handle.cancel))

    def result(self) -> LoadResult:
        return self._loop.run(_await(self._handle))


def open(url: str | os.PathLike[str], **options: Unpack[OpenOptions]) -> SyncStore:  # noqa: A001 - mirrors kvstore.open
    """Open a store for blocking use; the arguments are those of ``kvstore.open``."""
    opening = open_async(url, **options)
    loop = LoopThread()
    try:
        store = loop.run(_await(opening))
    except BaseException:
        loop.stop()
        raise
    return SyncStore(store, loop)


async def _next(stream: LayerStream) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    return await anext(stream, None)


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _call(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the loop thread: the store's prefetch buffer belongs to it."""
    return fn()
