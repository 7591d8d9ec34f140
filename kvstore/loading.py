"""Loading a prefix layer by layer: the one loader behind ``load_prefix``, ``load_prefix_layers`` and ``prefetch``.

A load finds the chain with one round of HEADs (which fixes the hit's length;
a load from S3 probes long chains, ``kvstore.probing``, and a chunk found
missing shortens it), then reads every chunk's data object at once under the store's request limit,
in chunk order: one request per chunk for a whole load, or two for a
layer-pipelined one (layer 0 first). ``LayerStream`` hands the layers out in
order as each one is complete in every chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvstore.errors import FormatVersionError, IntegrityError, ObjectNotFoundError, StoreUnavailableError
from kvstore.fetching import SharedReads
from kvstore.formats.layout import data_path
from kvstore.gpu.staging import Stagings
from kvstore.reading import ChunkReader, Hit, LayerBytes
from kvstore.requests import Counters
from kvstore.results import LayerKV, LoadResult
from kvstore.spec import ModelSpec
from kvstore.tensors import byte_view, empty_kv

if TYPE_CHECKING:
    from kvstore.writeback import PendingMatch

__all__ = ["LayerStream", "LoadServices", "LoadState"]

logger = logging.getLogger("kvstore")


@dataclass(frozen=True, slots=True)
class LoadServices:
    """What every load of one store shares: its reader, shared reads, staging buffers and counters."""

    reader: ChunkReader
    shared: SharedReads
    stagings: Stagings
    counters: Counters


class LayerStream:
    """The layers of one load, yielded in order as each becomes complete: ``(layer, k, v)``.

    Nothing is read until the first ``__anext__``: it finds the chain (one round
    of HEADs), which fixes ``num_tokens``, then starts one read per chunk, in
    chunk order, within the store's request limit. With ``split`` (what
    ``load_prefix_layers`` uses) each chunk's layer 0 comes from a first small
    read, so layer 0 is complete once every chunk's first read is, long before
    the rest arrives. Each yielded layer has all its chunks read and verified,
    up to ``num_tokens``.

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
        services: LoadServices,
        spec: ModelSpec,
        mid: bytes,
        tokens: np.ndarray,
        device: torch.device,
        pending: PendingMatch | None = None,
        *,
        split: bool = False,
    ) -> None:
        self._services = services
        self._pending = pending  # a background save's host copy of a prefix (read-your-writes)
        self._spec = spec
        self._mid = mid
        self._tokens = tokens
        self._device = device
        self._split = split
        self._transfers = services.stagings.for_device(device).transfers()
        self._interrupted = False  # requests were cancelled in flight: the host buffers must not be reused
        self._state = LoadState()
        self._hits: list[Hit] = []
        self._host: list[LayerKV] = []
        self._yielded: list[LayerKV] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._finished = False
        self._closed = False
        self.num_tokens = 0
        """Tokens of the hit: set once the chain is found, then only shrinks."""
        services.counters.loads += 1

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
            if self._tasks and layer < len(self._host) and self.num_tokens > 0:
                await self._state.wait_layer(layer)
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
        counters = self._services.counters
        try:
            try:
                async with asyncio.timeout(timeout):
                    async for _ in self:
                        pass
            except TimeoutError:
                counters.loads_timed_out += 1
                logger.warning("load of %s stopped at its %.3f s deadline", self._spec.label, timeout)
                return self.completed()
            except StoreUnavailableError as exc:
                if not fail_open:
                    raise
                counters.read_errors += 1
                logger.warning("load of %s failed open: %s", self._spec.label, exc)
                return self.completed()
            return self.result()
        finally:
            await self.aclose()

    def completed(self) -> LoadResult:
        """The leading chunks whose every layer is read and verified now, as a ``LoadResult``."""
        state, spec = self._state, self._spec
        m = 0
        while m < min(state.cut, len(state.layers_done)) and state.layers_done[m] == spec.num_layers:
            m += 1
        n = self._hits[m - 1].key.end if m and self._host else 0
        if self._pending is not None and self._host:  # served from a background save: all there at once
            n, m = self.num_tokens, 0
        self._services.counters.count_load(len(self._tokens), n, self._services.reader.chunk_tokens)
        if n == 0:
            return LoadResult(0, empty_kv(spec, self._device), 0, state.damaged, state.bytes_read)
        copies = [self._transfers.to_device([k[:n], v[:n]], copy=True) for k, v in self._host]
        kv = tuple((k, v) for k, v in copies)
        self._services.counters.chunks_loaded += m
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
            self._services.counters.bytes_read += self._state.bytes_read

    async def _cancel_pending(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self._interrupted = True
            await asyncio.wait(pending)

    def __del__(self) -> None:
        transfers = getattr(self, "_transfers", None)
        if transfers is not None:
            transfers.abandon()
        for t in getattr(self, "_tasks", ()):
            if not t.done():
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    t.cancel()

    async def _start(self) -> None:
        services, spec, mid, state = self._services, self._spec, self._mid, self._state
        pending = self._pending
        hits: list[Hit] = []
        if pending is None or pending.num_tokens < len(self._tokens):  # else nothing stored can be longer
            hits = await services.reader.find_chain(spec, mid, self._tokens, probe=True)
        if pending is not None and pending.num_tokens > (hits[-1].key.end if hits else 0):
            self.num_tokens = pending.num_tokens
            self._host = list(pending.host)
            return
        self._pending = None
        if not hits:
            return
        self._hits = hits
        self.num_tokens = hits[-1].key.end
        shape = (self.num_tokens, spec.num_kv_heads, spec.head_dim)
        host = self._transfers.host_empty
        self._host = [(host(shape, spec.dtype), host(shape, spec.dtype)) for _ in range(spec.num_layers)]
        state.start(len(hits), spec.num_layers)
        # Created in chunk order, so the FIFO request limit serves chunk 0 first (and, with split, every
        # chunk's first read before any second one). The tasks hold the state, not the stream, so a
        # dropped stream is collected (and cancels them).
        row = spec.row_bytes
        views = [(byte_view(k), byte_view(v)) for k, v in self._host]
        self._tasks = [
            asyncio.create_task(
                _load_chunk(
                    services,
                    spec,
                    mid,
                    hit,
                    [
                        (kb[hit.key.start * row : hit.key.end * row], vb[hit.key.start * row : hit.key.end * row])
                        for kb, vb in views
                    ],
                    state,
                    j,
                    self._split,
                )
            )
            for j, hit in enumerate(hits)
        ]

    def _shrink(self) -> None:
        if self._state.first_bad < len(self._hits):
            self.num_tokens = min(self.num_tokens, self._hits[self._state.first_bad].key.start)

    async def _finish(self) -> None:
        """Normal end: release the requests, report the damaged chunk that cut the hit, count."""
        await self._cancel_pending()  # only skipped requests are left, if any
        self._finished = self._closed = True
        self._host, self._pending = [], None
        await self._transfers.aclose(reuse=not self._interrupted)
        state, c = self._state, self._services.counters
        if state.first_bad < len(self._hits) and state.damage:
            await self._services.reader.report_damage(
                self._spec, self._mid, self._hits[state.first_bad].key, state.error
            )
        c.chunks_loaded += state.first_bad if self.num_tokens else 0
        c.count_load(len(self._tokens), self.num_tokens, self._services.reader.chunk_tokens)
        c.bytes_read += state.bytes_read


async def _load_chunk(
    services: LoadServices,
    spec: ModelSpec,
    mid: bytes,
    hit: Hit,
    dest: list[LayerBytes],
    state: LoadState,
    j: int,
    split: bool,
) -> None:
    """Chunk ``j`` of a load: damage ends the hit before it; any other failure fails the whole load."""
    path = data_path(mid, hit.key.digest, hit.key.num_tokens)
    flat = [b for pair in dest for b in pair]
    try:
        if j >= state.first_bad:
            return
        waiter = services.shared.follow(path, flat)
        if waiter is not None:
            state.unbar(j)
        if waiter is not None and await waiter:  # another load's read in flight filled our buffers
            state.progress(j, spec.num_layers)
            return
        # Owner of the read, or a follower whose owner failed: read it here (unshared, so no second wait).
        owner, delivered = waiter is None, False
        counted = 0

        def progress(layers: int, nbytes: int) -> None:
            nonlocal counted
            state.bytes_read += max(0, nbytes - counted)
            counted = max(counted, nbytes)
            state.progress(j, layers)

        try:
            await services.reader.read_chunk(
                spec, mid, hit, dest, split=split, progress=progress, before_rest=state.layer0_complete
            )
            if owner:
                services.counters.reads_shared += services.shared.deliver(path, flat)
                delivered = True
        finally:
            if owner and not delivered:
                services.shared.abandon(path)
    except (IntegrityError, FormatVersionError) as exc:
        state.fail(j, exc, damage=True)
    except ObjectNotFoundError as exc:  # deleted since the HEAD (GC, repair): a shorter hit, not damage
        state.fail(j, exc, damage=False)
    except Exception as exc:  # raised to the consumer by LayerStream.__anext__
        if state.failure is None:
            state.failure = exc
        state.first_bad = 0  # issue no more requests
        state.notify()


class LoadState:
    """Shared progress of one load: the first damaged chunk cuts off all later work."""

    __slots__ = (
        "_changed",
        "_layer0",
        "_unbarred",
        "bytes_read",
        "chunks_done",
        "cut",
        "damage",
        "damaged",
        "error",
        "failure",
        "first_bad",
        "layers_done",
        "num_layers",
    )

    def __init__(self) -> None:
        self.first_bad = 0
        self.cut = 0  # the first damaged chunk (first_bad also drops to 0 when a request fails)
        self.bytes_read = 0
        self.damaged = 0
        self.damage = False  # the cut is damage (not a chunk deleted since the HEAD)
        self.error: BaseException | None = None
        self.failure: BaseException | None = None  # not damage: the store failed a request
        self.layers_done: list[int] = []  # per chunk: leading layers read and verified
        self.num_layers = 0
        self.chunks_done = 0
        self._changed = asyncio.Event()
        self._layer0 = asyncio.Event()  # layer 0 of every chunk of the hit is complete
        self._unbarred: set[int] = set()  # chunks that wait on another load's read: never wait for them

    def start(self, num_chunks: int, num_layers: int) -> None:
        self.first_bad = self.cut = num_chunks
        self.layers_done = [0] * num_chunks
        self.num_layers = num_layers

    def notify(self) -> None:
        self._changed.set()
        if not self._layer0.is_set() and (
            self.failure is not None
            or all(d >= 1 or j in self._unbarred for j, d in enumerate(self.layers_done[: self.first_bad]))
        ):
            self._layer0.set()

    def unbar(self, chunk: int) -> None:
        """``chunk`` follows another load's read: the layer-0 barrier must not wait for it (that load may
        itself be waiting at its own barrier for one of ours)."""
        self._unbarred.add(chunk)
        self.notify()

    async def layer0_complete(self) -> None:
        """Until layer 0 is complete in every chunk of the hit: a layer-pipelined load's later layers wait for
        it, so that they do not compete with the first layer for the store."""
        await self._layer0.wait()

    def progress(self, chunk: int, layers: int) -> None:
        """Chunk ``chunk`` has its first ``layers`` layers complete."""
        if chunk >= self.first_bad or layers <= self.layers_done[chunk]:
            return  # (also a report of bytes only)
        self.layers_done[chunk] = layers
        if layers == self.num_layers:
            self.chunks_done += 1
        self.notify()

    def fail(self, chunk: int, exc: BaseException, *, damage: bool) -> None:
        if chunk < self.first_bad:
            self.first_bad, self.error, self.damage = chunk, exc, damage
            self.damaged = int(damage and not isinstance(exc, FormatVersionError))
        self.cut = min(self.cut, chunk)
        self.notify()

    async def wait_layer(self, layer: int) -> None:
        """Until ``layer`` is complete in every chunk still part of the hit (or the load failed)."""
        while self.failure is None and any(d <= layer for d in self.layers_done[: self.first_bad]):
            self._changed.clear()
            await self._changed.wait()
