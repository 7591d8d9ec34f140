"""Loading a prefix layer by layer: the one loader behind ``load_prefix``, ``load_prefix_layers`` and ``prefetch``.

A load reads the chain's commit records (which fix the hit's length), then
requests every layer object at once, layer-major, under the store's request
limit; ``LayerStream`` hands the layers out in order as each one completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvstore.errors import StoreUnavailableError
from kvstore.formats.keys import ChunkKey
from kvstore.formats.records import CommitRecord
from kvstore.results import LayerKV, LoadResult
from kvstore.spec import ModelSpec
from kvstore.tensors import empty_kv

if TYPE_CHECKING:
    from kvstore.store import KVStore
    from kvstore.writeback import PendingMatch

__all__ = ["LayerStream", "LoadState"]

logger = logging.getLogger("kvstore")


class LayerStream:
    """The layers of one load, yielded in order as each becomes complete: ``(layer, k, v)``.

    Nothing is read until the first ``__anext__``: it reads the commit records,
    which fix ``num_tokens``, then issues every layer request at once, layer-major
    (all chunks of layer 0 before any of layer 1) within the store's request limit.
    Each yielded layer has all its chunks read and verified, up to ``num_tokens``.

    Read-your-writes: a prefix that a background save of the same store still
    holds (``pending``) is served from its host copy when the store has nothing
    longer, without a request.

    Damage: a chunk found damaged ends the hit before it. Layers already yielded
    cannot be recalled, so ``num_tokens`` only ever shrinks: later layers come
    truncated to the damaged chunk's start, and after the loop ``num_tokens`` is
    the final hit (use only that many tokens of the earlier layers). If it drops
    to 0 the stream ends early. A miss yields nothing.

    Leaving the loop early: ``aclose()`` (or ``async with``) cancels and awaits
    every outstanding request; a stream abandoned without it is cancelled when it
    is garbage-collected. Cancelling the consumer during ``__anext__`` cancels all.

    Host buffers come from the store's staging for ``device``: pinned and pooled
    for CUDA, where each complete layer is copied to the device on the copy
    stream (see ``kvstore.gpu``). They go back to the pool when the stream ends,
    once the copies are done; after a cancellation (a read may still be writing
    into them from a worker thread) their bytes go back to the budget but the
    memory itself is never reused.
    """

    def __init__(
        self,
        store: KVStore,
        spec: ModelSpec,
        mid: bytes,
        tokens: np.ndarray,
        device: torch.device,
        pending: PendingMatch | None = None,
    ) -> None:
        self._store = store
        self._pending = pending  # a background save's host copy of a prefix (read-your-writes)
        self._spec = spec
        self._mid = mid
        self._tokens = tokens
        self._device = device
        self._transfers = store._stagings.for_device(device).transfers()
        self._interrupted = False  # requests were cancelled in flight: the host buffers must not be reused
        self._state = LoadState()
        self._hits: list[tuple[ChunkKey, CommitRecord]] = []
        self._host: list[LayerKV] = []
        self._yielded: list[LayerKV] = []
        self._tasks: list[list[asyncio.Task[None]]] = []
        self._started = False
        self._finished = False
        self._closed = False
        self.num_tokens = 0
        """Tokens of the hit: set once the commit records are read, then only shrinks."""
        store._counters.loads += 1

    @property
    def chunks_done(self) -> int:
        """Chunks whose every layer has been read and verified (progress)."""
        return self._state.chunks_done

    @property
    def bytes_read(self) -> int:
        """Stored bytes read so far (progress)."""
        return self._state.bytes_read

    @property
    def chunks_damaged(self) -> int:
        return self._state.damaged

    def __aiter__(self) -> LayerStream:
        return self

    async def __aenter__(self) -> LayerStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        if self._closed:
            raise StopAsyncIteration
        try:
            if not self._started:
                self._started = True
                await self._start()
            layer = len(self._yielded)
            if layer < len(self._tasks) and self.num_tokens > 0:
                await asyncio.wait(self._tasks[layer])
                if self._state.failure is not None:
                    raise self._state.failure
                self._shrink()
            if layer >= len(self._host) or self.num_tokens == 0:
                await self._finish()
                raise StopAsyncIteration
        except StopAsyncIteration:
            raise
        except BaseException:
            await self._abort()  # the buffers stay until aclose(): completed() may still read them
            raise
        n = self.num_tokens
        k, v = self._host[layer]
        # A background save's copy is copied again: the caller may change what it gets, the upload must not see it.
        k, v = self._transfers.to_device([k[:n], v[:n]], copy=self._pending is not None)
        self._yielded.append((k, v))
        return layer, k, v

    async def collect(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - returns what is complete at the deadline
        fail_open: bool = False,
    ) -> LoadResult:
        """Consume the whole stream into a ``LoadResult`` (what ``load_prefix`` returns).

        Past ``timeout`` seconds, or on a store failure with ``fail_open``, the
        result is what is complete by then (``completed()``), possibly a miss.
        """
        try:
            try:
                async with asyncio.timeout(timeout):
                    async for _ in self:
                        pass
            except TimeoutError:
                self._store._counters.loads_timed_out += 1
                logger.warning("load of %s stopped at its %.3f s deadline", self._spec.label, timeout)
                return self.completed()
            except StoreUnavailableError as exc:
                if not fail_open:
                    raise
                self._store._counters.read_errors += 1
                logger.warning("load of %s failed open: %s", self._spec.label, exc)
                return self.completed()
            return self.result()
        finally:
            await self.aclose()

    def completed(self) -> LoadResult:
        """The leading chunks whose every layer is read and verified now, as a ``LoadResult``."""
        state, spec = self._state, self._spec
        m = 0
        while m < min(state.cut, len(state.layers_left)) and state.layers_left[m] == 0:
            m += 1
        n = self._hits[m - 1][0].end if m and self._host else 0
        if self._pending is not None and self._host:  # served from a background save: all there at once
            n, m = self.num_tokens, 0
        if n == 0:
            return LoadResult(0, empty_kv(spec, self._device), 0, state.damaged, state.bytes_read)
        copies = [self._transfers.to_device([k[:n], v[:n]], copy=True) for k, v in self._host]
        kv = tuple((k, v) for k, v in copies)
        self._store._counters.chunks_loaded += m
        return LoadResult(n, kv, m, state.damaged, state.bytes_read)

    def result(self) -> LoadResult:
        """The ``LoadResult`` of a stream consumed to its end."""
        if not self._finished:
            raise RuntimeError("the layer stream has not been consumed to its end")
        n, spec = self.num_tokens, self._spec
        if n == 0:
            kv = empty_kv(spec, self._device)
        elif len(self._hits) == self._state.first_bad:
            kv = tuple(self._yielded)
        else:  # cut short: earlier layers were yielded longer; copy so the rest of the buffers can go
            kv = tuple((k[:n].clone(), v[:n].clone()) for k, v in self._yielded)
        return LoadResult(n, kv, self._state.first_bad if n else 0, self._state.damaged, self._state.bytes_read)

    async def aclose(self) -> None:
        """Cancel and await every outstanding request, and release the buffers. Idempotent."""
        await self._abort()
        self._host, self._pending = [], None
        await self._transfers.aclose(reuse=not self._interrupted)

    async def _abort(self) -> None:
        """Cancel and await every outstanding request; the buffers stay."""
        if self._closed:
            return
        self._closed = True
        await self._cancel_pending()
        if not self._finished:
            self._store._counters.bytes_read += self._state.bytes_read

    async def _cancel_pending(self) -> None:
        pending = [t for tasks in self._tasks for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self._interrupted = True
            await asyncio.wait(pending)

    def __del__(self) -> None:
        transfers = getattr(self, "_transfers", None)
        if transfers is not None:
            transfers.abandon()
        for tasks in self._tasks:
            for t in tasks:
                if not t.done():
                    with contextlib.suppress(RuntimeError):  # the loop may be closed already
                        t.cancel()

    async def _start(self) -> None:
        store, spec, mid, state = self._store, self._spec, self._mid, self._state
        pending = self._pending
        hits: list[tuple[ChunkKey, CommitRecord]] = []
        if pending is None or pending.num_tokens < len(self._tokens):  # else nothing stored can be longer
            hits = await store._find_chain(
                spec, mid, self._tokens, lambda key: store._read_commit(spec, mid, key, state)
            )
        if pending is not None and pending.num_tokens > (hits[-1][0].end if hits else 0):
            self.num_tokens = pending.num_tokens
            self._host = list(pending.host)
            return
        self._pending = None
        if not hits:
            return
        self._hits = hits
        self.num_tokens = hits[-1][0].end
        shape = (self.num_tokens, spec.num_kv_heads, spec.head_dim)
        host = self._transfers.host_empty
        self._host = [(host(shape, spec.dtype), host(shape, spec.dtype)) for _ in range(spec.num_layers)]
        state.first_bad = state.cut = len(hits)
        state.layers_left = [spec.num_layers] * len(hits)
        # Created layer-major, so the FIFO request limit serves every chunk of layer 0 before layer 1's.
        # The tasks hold the state, not the stream, so a dropped stream is collected (and cancels them).
        self._tasks = [
            [
                asyncio.create_task(_load_part(store, spec, mid, hits, self._host[layer], state, layer, j))
                for j in range(len(hits))
            ]
            for layer in range(spec.num_layers)
        ]

    def _shrink(self) -> None:
        if self._state.first_bad < len(self._hits):
            self.num_tokens = min(self.num_tokens, self._hits[self._state.first_bad][0].start)

    async def _finish(self) -> None:
        """Normal end: release the requests, report the damaged chunk that cut the hit, count."""
        await self._cancel_pending()  # only skipped requests are left, if any
        self._finished = self._closed = True
        self._host, self._pending = [], None
        await self._transfers.aclose(reuse=not self._interrupted)
        state, c = self._state, self._store._counters
        if state.first_bad < len(self._hits):
            await self._store._report_damage(self._spec, self._mid, self._hits[state.first_bad][0], state.error, state)
        c.chunks_loaded += state.first_bad if self.num_tokens else 0
        c.bytes_read += state.bytes_read


async def _load_part(
    store: KVStore,
    spec: ModelSpec,
    mid: bytes,
    hits: list[tuple[ChunkKey, CommitRecord]],
    dest: LayerKV,
    state: LoadState,
    layer: int,
    j: int,
) -> None:
    """One layer object of one chunk; a failure other than damage is kept and fails the whole load."""
    try:
        await store._load_layer(spec, mid, hits, j, layer, dest, state)
    except Exception as exc:  # raised to the consumer by LayerStream.__anext__
        if state.failure is None:
            state.failure = exc
        state.first_bad = 0  # issue no more requests
        return
    if j < state.first_bad:  # read and verified, and still part of the hit
        state.layers_left[j] -= 1
        if state.layers_left[j] == 0:
            state.chunks_done += 1


class LoadState:
    """Shared progress of one load: the first damaged chunk cuts off all later work."""

    __slots__ = ("bytes_read", "chunks_done", "cut", "damaged", "error", "failure", "first_bad", "layers_left")

    def __init__(self) -> None:
        self.first_bad = 0
        self.cut = 0  # the first damaged chunk (first_bad also drops to 0 when a request fails)
        self.bytes_read = 0
        self.damaged = 0
        self.error: BaseException | None = None
        self.failure: BaseException | None = None  # not damage: the store failed a request
        self.layers_left: list[int] = []  # per chunk: layers not yet read
        self.chunks_done = 0

    def fail(self, chunk: int, exc: BaseException) -> None:
        if chunk < self.first_bad:
            self.first_bad, self.error = chunk, exc
        self.cut = min(self.cut, chunk)
