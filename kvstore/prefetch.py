"""Background loads started ahead of need, held in a byte-bounded buffer until a ``load_prefix`` claims them.

The buffer owns every prefetch task: a task ends by finishing, by being claimed
and awaited by ``load_prefix``, by ``PrefetchHandle.cancel``, by eviction past
the byte budget, or by ``KVStore.close`` (which cancels and awaits them all).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Any, Protocol

import numpy as np
import torch

from kvstore.errors import KVStoreError
from kvstore.results import LoadResult
from kvstore.spec import ModelSpec
from kvstore.tensors import empty_kv

__all__ = ["PrefetchBuffer", "PrefetchHandle", "PrefetchKey", "prefetch_key"]

logger = logging.getLogger("kvstore")

PrefetchKey = tuple[bytes, bytes, str]
"""(model id, token bytes, device): what a ``load_prefix`` must match to join a prefetch."""


def prefetch_key(mid: bytes, tokens: np.ndarray, device: torch.device) -> PrefetchKey:
    return mid, tokens.tobytes(), str(device)


class Loader(Protocol):
    """What a prefetch runs: a ``LayerStream`` (progress attributes and ``collect``)."""

    @property
    def chunks_done(self) -> int: ...

    @property
    def bytes_read(self) -> int: ...

    async def collect(self) -> LoadResult: ...

    def completed(self) -> LoadResult: ...


class PrefetchHandle:
    """A prefetch in flight or done: await it for the ``LoadResult``, ``cancel()`` it, watch its progress.

    Awaiting does not take the result out of the buffer (a ``load_prefix`` does),
    and cancelling the awaiting task does not cancel the prefetch. Awaiting a
    dropped or cancelled prefetch raises ``asyncio.CancelledError``.
    """

    def __init__(self, buffer: PrefetchBuffer, key: PrefetchKey, nbytes: int, loader: Loader | None) -> None:
        self._buffer = buffer
        self._key = key
        self._loader = loader
        self.nbytes = nbytes
        """Bytes charged to the budget: an upper bound while running, the result's size once done."""
        self._future: asyncio.Future[LoadResult]
        if loader is None:  # did not fit the budget at all: dropped before it started
            self._future = asyncio.get_running_loop().create_future()
            self._future.cancel()
        else:
            self._future = asyncio.get_running_loop().create_task(loader.collect())

    @property
    def chunks_done(self) -> int:
        """Chunks read and verified so far (every layer of them)."""
        return self._loader.chunks_done if self._loader is not None else 0

    @property
    def bytes_done(self) -> int:
        """Stored bytes read so far."""
        return self._loader.bytes_read if self._loader is not None else 0

    def done(self) -> bool:
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def cancel(self) -> bool:
        """Drop the prefetch: stop its requests and free its buffers. False when it had already finished."""
        self._buffer._remove(self)
        return self._future.cancel()

    def __await__(self) -> Generator[Any, None, LoadResult]:
        return asyncio.shield(self._future).__await__()

    def completed(self, spec: ModelSpec, device: torch.device) -> LoadResult:
        """What the prefetch has read and verified so far (the leading complete chunks), as a ``LoadResult``."""
        if self._future.done() and not self._future.cancelled() and self._future.exception() is None:
            return self._future.result()
        if self._loader is None:
            return LoadResult(0, empty_kv(spec, device), 0, 0, 0)
        return self._loader.completed()

    async def join(self, timeout: float | None = None) -> LoadResult | None:  # noqa: ASYNC109
        """Await a claimed prefetch as its new owner: None when it failed or was cancelled, so the caller loads.

        None as well when ``timeout`` seconds pass first; the prefetch then runs
        on (``done()`` is False) for others who await it. If the caller is
        cancelled meanwhile, the prefetch is cancelled too and awaited.
        """
        try:
            if timeout is not None:
                await asyncio.wait([self._future], timeout=timeout)
                if not self._future.done():
                    return None
            return await asyncio.shield(self._future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._future.cancel()
                await asyncio.wait([self._future])
                raise
            return None  # the prefetch itself was cancelled (the store closing): load afresh
        except KVStoreError as exc:  # the error reaches the caller through its own, retried load
            logger.info("prefetch failed, loading again: %s", exc)
            return None


class PrefetchBuffer:
    """Unclaimed prefetches, oldest first, whose charged bytes stay within ``budget``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[PrefetchKey, PrefetchHandle] = OrderedDict()
        self._tasks: set[asyncio.Future[LoadResult]] = set()
        self.used = 0
        """Bytes charged by the unclaimed prefetches."""
        self.started = 0
        self.claimed = 0
        """Prefetches a load took over (one put back unfinished counts at its last claim only)."""
        self.dropped = 0
        """Prefetches evicted to make room, or not started because they exceed the budget."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def start(self, key: PrefetchKey, nbytes: int, make_loader: Callable[[], Loader]) -> PrefetchHandle:
        """The prefetch of ``key``: the one already buffered, or a new one after evicting the oldest to fit."""
        existing = self._entries.get(key)
        if existing is not None:
            return existing
        if nbytes > self.budget:
            logger.info("prefetch of %d bytes exceeds the budget of %d bytes; not started", nbytes, self.budget)
            self.dropped += 1
            return PrefetchHandle(self, key, nbytes, None)
        while self.used + nbytes > self.budget:
            _, oldest = self._entries.popitem(last=False)
            self.used -= oldest.nbytes
            oldest._future.cancel()
            self.dropped += 1
        handle = PrefetchHandle(self, key, nbytes, make_loader())
        self.started += 1
        self._entries[key] = handle
        self.used += nbytes
        self._tasks.add(handle._future)
        handle._future.add_done_callback(lambda fut: self._done(handle, fut))
        return handle

    def claim(self, key: PrefetchKey) -> PrefetchHandle | None:
        """Take the prefetch of ``key`` out of the buffer; the caller now owns (and awaits) it."""
        handle = self._entries.pop(key, None)
        if handle is not None:
            self.used -= handle.nbytes
            self.claimed += 1
        return handle

    def put_back(self, handle: PrefetchHandle) -> None:
        """Return a claimed prefetch that is still running, so a later load can claim it again."""
        if not handle.done() and handle._key not in self._entries:
            self._entries[handle._key] = handle
            self.used += handle.nbytes
            self.claimed -= 1

    def _remove(self, handle: PrefetchHandle) -> None:
        if self._entries.get(handle._key) is handle:
            del self._entries[handle._key]
            self.used -= handle.nbytes

    def _done(self, handle: PrefetchHandle, fut: asyncio.Future[LoadResult]) -> None:
        self._tasks.discard(fut)
        if fut.cancelled():
            self._remove(handle)
            return
        exc = fut.exception()  # retrieved here so a failure nobody awaits is not reported as lost
        if exc is not None:
            logger.info("prefetch failed: %s", exc)
            self._remove(handle)  # a failed prefetch never poisons a later load: that one retries
            return
        actual = sum(k.nbytes + v.nbytes for k, v in fut.result().kv)
        if self._entries.get(handle._key) is handle:
            self.used += actual - handle.nbytes
        handle.nbytes = actual

    async def close(self) -> None:
        """Cancel every prefetch still running (claimed ones included) and wait for them to end."""
        self._entries.clear()
        self.used = 0
        pending = list(self._tasks)
        for fut in pending:
            fut.cancel()
        if pending:
            await asyncio.wait(pending)
