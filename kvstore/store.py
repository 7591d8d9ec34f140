"""KVStore: save, look up and load KV-cache prefixes as content-addressed chunks.

Every object request of a call runs concurrently under one per-store limit
(``max_concurrency``); CPU work (encoding, hashing, copying) runs in worker
threads so the event loop never stalls on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, overload

import numpy as np
import torch

from kvstore._tasks import both, run_all
from kvstore._workers import in_worker
from kvstore.access import DEFAULT_FLUSH_INTERVAL, AccessRecorder
from kvstore.errors import (
    InvalidInputError,
    ModelRetiredError,
    StoreUnavailableError,
)
from kvstore.fetching import SharedReads
from kvstore.formats.codecs import DEFAULT_CODEC, Codec, get_codec
from kvstore.formats.dtypes import dtype_info
from kvstore.formats.keys import ChunkKey, TokenInput, chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import (
    MODELS_DIR,
    data_path,
    metadata_path,
    model_record_path,
    retirement_record_path,
    tail_marker_path,
    zarr_array_metadata,
)
from kvstore.formats.records import ChunkHeader, ModelRecord
from kvstore.formats.shard import data_object, encode_layers
from kvstore.gpu.staging import DEFAULT_PINNED_POOL_BYTES, Stagings
from kvstore.loading import LayerStream, LoadServices
from kvstore.prefetch import PrefetchBuffer, PrefetchHandle, prefetch_key
from kvstore.reading import ChunkReader
from kvstore.registry import Registry, read_registry, retire_models
from kvstore.requests import Counters, Requests
from kvstore.results import LayerKV, LoadResult, ModelInfo, RequestStats, SaveResult, StoreStats
from kvstore.spec import ModelSpec
from kvstore.storage import ObjectMeta, ObjectStore
from kvstore.storage.instrumented import InstrumentedObjectStore, storage_layers
from kvstore.storage.resilient import ResilientObjectStore, RetryStats
from kvstore.storage.tiers import TieredObjectStore, TierStats
from kvstore.tensors import byte_view, check_kv
from kvstore.writeback import SaveHandle, WriteBack

__all__ = ["DEFAULT_CHUNK_TOKENS", "KVStore", "StoreOptions"]

logger = logging.getLogger("kvstore")

DEFAULT_CHUNK_TOKENS = 256

LIVE_CHECK_TTL = 60.0
"""Seconds a store trusts that a model version is not retired before checking again (one HEAD)."""


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Per-store settings. ``chunk_tokens`` is fixed when the store is created."""

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    codec: str = DEFAULT_CODEC
    max_concurrency: int = 32
    verify: bool = True
    save_tail: bool = True
    repair: bool = True
    """Delete the data object of a chunk found damaged in the source, so the next save rewrites it."""
    fail_open: bool = True
    """Loads and lookups turn a store failure into a (shorter) hit, logged and counted; saves always raise."""
    writeback_budget: int = 1 << 30
    """Bytes of KV that background saves (``save_prefix(wait=False)``) may hold; past it saves wait."""
    prefetch_budget: int = 1 << 30
    """Bytes of KV that unclaimed prefetches may hold; past it the oldest are dropped."""
    pinned_pool_bytes: int = DEFAULT_PINNED_POOL_BYTES
    """Pinned host memory for CUDA copies (allocated on first use, reused); past it copies use pageable memory."""
    record_access: bool = True
    """Record which chunks loads, lookups and saves use (access records), for the GC's eviction by recency."""
    access_flush_interval: float = DEFAULT_FLUSH_INTERVAL
    """Seconds between writes of the access records' batches (also written when full and on close)."""

    def __post_init__(self) -> None:
        get_codec(self.codec)
        if (
            isinstance(self.max_concurrency, bool)
            or not isinstance(self.max_concurrency, int)
            or self.max_concurrency < 1
        ):
            raise InvalidInputError(f"max_concurrency must be a positive int, got {self.max_concurrency!r}")
        for name in ("prefetch_budget", "writeback_budget", "pinned_pool_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{name} must be an int >= 0, got {value!r}")
        interval = self.access_flush_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval < math.inf:
            raise InvalidInputError(f"access_flush_interval must be a number of seconds > 0, got {interval!r}")
        if not isinstance(self.record_access, bool):
            raise InvalidInputError(f"record_access must be a bool, got {self.record_access!r}")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int):
            raise InvalidInputError(f"chunk_tokens must be an int in [1, 2**24], got {self.chunk_tokens!r}")
        if not 1 <= self.chunk_tokens <= 1 << 24:
            raise InvalidInputError(f"chunk_tokens must be an int in [1, 2**24], got {self.chunk_tokens!r}")


def _check_spec(spec: object) -> ModelSpec:
    if not isinstance(spec, ModelSpec):
        raise InvalidInputError(f"spec must be a kvstore.ModelSpec, got {type(spec).__name__}")
    return spec


def _device(device: torch.device | str) -> torch.device:
    """Parse ``device`` and check it is usable now, before any I/O is spent on a load."""
    try:
        dev = torch.device(device)
        if dev.type != "cpu":
            torch.empty(0, device=dev)
    except (RuntimeError, TypeError, AssertionError) as exc:  # torch asserts when CUDA is not compiled in
        raise InvalidInputError(f"device {device!r} is not usable: {exc}") from None
    return dev


class KVStore:
    """An open store. Create it with ``await kvstore.open(url)``; close it with ``close()``."""

    def __init__(self, backend: ObjectStore, options: StoreOptions) -> None:
        self._backend = backend
        self.options = options
        self._codec: Codec = get_codec(options.codec)
        self._counters = Counters()
        self._requests = Requests(backend, options.max_concurrency, self._counters)
        self._access = (
            AccessRecorder(self._requests, self._counters, interval=options.access_flush_interval)
            if options.record_access
            else None
        )
        self._reader = ChunkReader(
            self._requests,
            options.chunk_tokens,
            options.codec,
            verify=options.verify,
            repair=options.repair,
            access=self._access,
        )
        self._known_models: set[bytes] = set()
        self._known_arrays: set[tuple[bytes, int]] = set()
        self._arrays_lock = asyncio.Lock()
        self._live_checked: dict[bytes, float] = {}  # model id -> monotonic time of the last retirement check
        self._prefetches = PrefetchBuffer(options.prefetch_budget)
        self._writeback = WriteBack(options.writeback_budget)
        self._stagings = Stagings(options.pinned_pool_bytes)
        self._loads = LoadServices(self._reader, SharedReads(), self._stagings, self._counters)
        self._closed = False

    @property
    def url(self) -> str:
        return self._backend.url

    @property
    def chunk_tokens(self) -> int:
        return self.options.chunk_tokens

    def stats(self) -> StoreStats:
        """A snapshot of this store's counters, with those of its retry and cache-tier layers."""
        c = self._counters
        extra: dict[str, Any] = {}
        for layer in storage_layers(self._backend):  # the wrappers opening.py stacked, by type
            counters: RetryStats | TierStats | None = None
            if isinstance(layer, ResilientObjectStore):
                counters = layer.stats
            elif isinstance(layer, TieredObjectStore):
                counters = layer.tier_stats
            if counters is not None:
                extra.update({f.name: getattr(counters, f.name) for f in fields(counters)})
        pool = self._stagings.pool
        if pool is not None:
            ps = pool.stats()
            extra.update(pinned_bytes=ps.allocated_bytes, pinned_reuses=ps.reuses, pinned_overflows=ps.overflows)
        return StoreStats(**{f.name: getattr(c, f.name) for f in fields(c)}, **extra)

    def request_stats(self) -> RequestStats:
        """Requests to the object store per operation with their latency, the circuit, the background queues, now.

        Request figures come from the ``InstrumentedObjectStore`` that ``kvstore.open``
        stacks over the backend (empty for a store built without one).
        """
        layers = storage_layers(self._backend)
        timed = next((x for x in layers if isinstance(x, InstrumentedObjectStore)), None)
        retrying = next((x for x in layers if isinstance(x, ResilientObjectStore)), None)
        wb, pf = self._writeback, self._prefetches
        return RequestStats(
            operations=timed.operation_stats() if timed is not None else {},
            circuit_open=retrying is not None and retrying.breaker.is_open,
            writeback_bytes=wb.used,
            writeback_saves=wb.queued,
            prefetch_bytes=pf.used,
            prefetches_held=len(pf),
            prefetches_started=pf.started,
            prefetches_claimed=pf.claimed,
            prefetches_dropped=pf.dropped,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError(f"{self.url}: the store is closed")

    def _keys(self, spec: ModelSpec, tokens: np.ndarray, *, include_tail: bool) -> list[ChunkKey]:
        return chunk_keys(spec, tokens, self.options.chunk_tokens, include_tail=include_tail)

    # ------------------------------------------------------------------ lookup

    async def lookup(self, spec: ModelSpec, tokens: TokenInput) -> int:
        """Number of leading tokens whose KV is cached, without moving tensor data.

        One concurrent round of HEADs; when the chain stops short, one listing
        finds a saved partial chunk that the query extends.
        """
        self._check_open()
        spec = _check_spec(spec)
        arr = normalize_tokens(tokens)
        self._counters.lookups += 1
        mid = model_id(spec)
        pending = self._writeback.match(mid, arr, self.options.chunk_tokens)  # read-your-writes
        held = pending.num_tokens if pending else 0
        if held == len(arr):
            return held
        try:
            hits = await self._reader.find_chain(spec, mid, arr)
        except StoreUnavailableError as exc:
            if not self.options.fail_open:
                raise
            self._counters.read_errors += 1
            logger.warning("lookup of %s failed open: %s", spec.label, exc)
            return held
        return max(held, hits[-1].key.end if hits else 0)

    # ------------------------------------------------------------------ save

    @overload
    async def save_prefix(
        self, spec: ModelSpec, tokens: TokenInput, kv: Sequence[LayerKV], *, wait: Literal[True] = ...
    ) -> SaveResult: ...

    @overload
    async def save_prefix(
        self, spec: ModelSpec, tokens: TokenInput, kv: Sequence[LayerKV], *, wait: Literal[False]
    ) -> SaveHandle: ...

    async def save_prefix(
        self, spec: ModelSpec, tokens: TokenInput, kv: Sequence[LayerKV], *, wait: bool = True
    ) -> SaveResult | SaveHandle:
        """Save the KV of ``tokens``; chunks already stored are skipped (content addressing).

        Input is checked completely before anything is written. With ``wait=False``
        the call returns a ``SaveHandle`` as soon as the KV is copied off the caller's
        tensors and uploads in the background (write-back): the prompt is visible to
        this store's ``lookup`` / ``load_prefix`` at once, the queue is bounded by
        ``writeback_budget`` bytes (a full queue makes this call wait), and upload
        errors are raised by ``flush()`` / ``close()`` unless the handle is awaited.
        """
        self._check_open()
        spec = _check_spec(spec)
        arr = normalize_tokens(tokens)
        if len(arr) == 0:
            raise InvalidInputError("cannot save an empty prompt")
        check_kv(spec, kv, len(arr))
        keys = self._keys(spec, arr, include_tail=self.options.save_tail)
        self._counters.saves += 1
        if wait:
            return await self._save(spec, keys, kv)
        end = keys[-1].end if keys else 0
        transfers = self._stagings.for_kv(kv).transfers()  # pinned buffers and a copy stream for CUDA KV
        return await self._writeback.submit(
            model_id(spec),
            arr[:end].copy(),
            lambda: transfers.to_host(kv, 0, end, copy=True),  # private, so the caller may reuse its buffers at once
            spec.bytes_per_token * end,
            lambda host: self._save(spec, keys, host),
            transfers,
        )

    async def flush(self) -> None:
        """Wait for every background save; raise WriteBackError if any failed (and was not awaited)."""
        await self._writeback.flush()

    async def _save(self, spec: ModelSpec, keys: list[ChunkKey], kv: Sequence[LayerKV]) -> SaveResult:
        if not keys:
            return SaveResult(0, 0, 0, 0, 0)
        mid = model_id(spec)
        # The two reads go out together: is the model retired, and how much of the chain is stored.
        _, (first_gap, seen) = await both(
            self._check_live(spec, mid), self._requests.find_first_missing([self._data_key(mid, k) for k in keys])
        )
        # Chunks after the first missing one are rewritten, not skipped: while the chain had a gap
        # they were unreachable, and rewriting refreshes their mtime so a concurrent GC's grace
        # period protects them (see "Garbage collection" in docs/FORMAT.md). Those not HEADed
        # (probing) are created, or rewritten when they turn out to be there.
        missing = keys[first_gap:]
        written: list[tuple[int, int]] = []
        arrays: list[int] = []
        if not missing:
            await self._ensure_model_record(spec, mid)
        else:
            base = missing[0].start  # copy only what is written, not the prefix already stored
            async with self._stagings.for_kv(kv).transfers() as transfers:
                # The records every data object needs first (model record, array metadata) are written
                # while the KV is copied to host memory.
                host, arrays = await both(
                    transfers.to_host(kv, base), self._ensure_records(spec, mid, {k.num_tokens for k in missing})
                )
                views = [(byte_view(k), byte_view(v)) for k, v in host]  # once per save, sliced per chunk
                written = await run_all(
                    self._write_chunk(spec, mid, key, views, base, present=_presence(seen, first_gap + i))
                    for i, key in enumerate(missing)
                )
        if self._access is not None:  # a save is a use of every chunk of its prefix, written or deduplicated
            self._access.record(mid, (k.digest for k in keys))
        nwritten = sum(1 for _, n in written if n)  # a concurrent writer may have created some first
        nbytes = sum(b for b, _ in written) + sum(arrays)
        c = self._counters
        c.chunks_written += nwritten
        c.chunks_skipped += len(keys) - nwritten
        c.bytes_written += nbytes
        return SaveResult(
            num_tokens=keys[-1].end,
            chunks_written=nwritten,
            chunks_skipped=len(keys) - nwritten,
            bytes_written=nbytes,
            objects_written=sum(n for _, n in written) + sum(1 for b in arrays if b),
        )

    @staticmethod
    def _data_key(mid: bytes, key: ChunkKey) -> str:
        return data_path(mid, key.digest, key.num_tokens)

    async def _ensure_records(self, spec: ModelSpec, mid: bytes, lengths: set[int]) -> list[int]:
        """The model record and each ``lengths`` array's ``zarr.json``, concurrently: bytes written per array."""
        _, written = await both(
            self._ensure_model_record(spec, mid), run_all(self._ensure_array(spec, mid, n) for n in sorted(lengths))
        )
        return written

    async def _ensure_model_record(self, spec: ModelSpec, mid: bytes) -> None:
        """Write the model's record once per open store (create-only: every writer's is the same)."""
        if mid in self._known_models:
            return
        await self._requests.put(model_record_path(mid), ModelRecord(mid, spec).to_msgpack(), create_only=True)
        self._known_models.add(mid)

    async def _ensure_array(self, spec: ModelSpec, mid: bytes, num_tokens: int) -> int:
        """Write the ``zarr.json`` of the model's array of ``num_tokens``-token chunks; return its bytes if written.

        Once per open store and array, before its first data object (so a
        committed chunk always has metadata); create-only, since the store's one
        codec makes every writer's metadata the same.
        """
        array = (mid, num_tokens)
        if array in self._known_arrays:
            return 0
        async with self._arrays_lock:
            if array in self._known_arrays:
                return 0
            meta = zarr_array_metadata(spec, num_tokens, self._codec.name)
            created = await self._requests.put(metadata_path(mid, num_tokens), meta, create_only=True)
            self._known_arrays.add(array)
            return len(meta) if created else 0

    async def _check_live(self, spec: ModelSpec, mid: bytes) -> None:
        """Refuse saves under a retired model; a positive check is trusted for LIVE_CHECK_TTL seconds."""
        now = time.monotonic()
        if now - self._live_checked.get(mid, -LIVE_CHECK_TTL) < LIVE_CHECK_TTL:
            return
        if await self._requests.head(retirement_record_path(mid)):
            raise ModelRetiredError(f"model {spec.label} was retired in {self.url}; save under a new version")
        self._live_checked[mid] = now

    async def _write_chunk(
        self,
        spec: ModelSpec,
        mid: bytes,
        key: ChunkKey,
        views: list[tuple[np.ndarray, np.ndarray]],
        base: int,
        *,
        present: bool | None,
    ) -> tuple[int, int]:
        """Write a chunk's data object, the commit point; return (bytes, objects).

        The data object is written create-only, so of concurrent writers of one
        chunk the first wins and the others skip it. A chunk ``present`` after a
        gap in its chain is overwritten instead, which renews its mtime; one not
        HEADed (None) is created, and overwritten if it turns out to be there.
        """
        path = self._data_key(mid, key)
        row = spec.row_bytes
        lo, hi = (key.start - base) * row, (key.end - base) * row  # views start at token `base`
        layers = [(k[lo:hi].data, v[lo:hi].data) for k, v in views]
        header = ChunkHeader(key.digest, key.parent, key.index, mid, key.num_tokens, spec.num_layers, self._codec.name)
        itemsize = dtype_info(spec.dtype).itemsize
        joined = not self._requests.writes_parts

        def encode() -> list[memoryview] | bytes:
            parts = data_object(header, encode_layers(self._codec, layers, itemsize))
            return b"".join(parts) if joined else parts  # joined here, not on the event loop

        # One worker-thread hop per chunk: checksums (and compression) of every layer, and the join.
        data = await in_worker(encode)

        async def put(*, create_only: bool) -> bool:
            if isinstance(data, bytes):
                return await self._requests.put(path, data, create_only=create_only)
            return await self._requests.put_parts(path, data, create_only=create_only)

        created = await put(create_only=present is not True)
        if not created and present is None:  # there after the gap: renew its mtime
            created = await put(create_only=False)
        if not created:  # another writer committed it first
            return 0, 0
        nbytes, nobjects = (len(data) if isinstance(data, bytes) else sum(len(p) for p in data)), 1
        if key.num_tokens < self.options.chunk_tokens:  # a tail: let longer queries find it
            await self._requests.put(tail_marker_path(mid, key.parent, key.num_tokens), key.digest)
            nbytes, nobjects = nbytes + len(key.digest), nobjects + 1
        return nbytes, nobjects

    # ------------------------------------------------------------------ load

    async def load_prefix(
        self,
        spec: ModelSpec,
        tokens: TokenInput,
        *,
        device: torch.device | str = "cpu",
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline that returns the partial hit
    ) -> LoadResult:
        """Load the KV of the longest cached prefix of ``tokens`` onto ``device``.

        Damaged chunks (bad checksum, size, structure or metadata) end the hit
        before them; they are counted, logged and never returned. A prefetch of
        the same tokens and device (``prefetch``) is joined instead of repeated.
        After ``timeout`` seconds the call returns the chunks complete by then
        (possibly a miss) instead of waiting; with ``fail_open`` (the default) a
        store failure does the same, so a store that is down costs a miss.
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
            raise InvalidInputError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        self._check_open()
        spec = _check_spec(spec)
        dev = _device(device)
        arr = normalize_tokens(tokens)
        return await self._load(spec, model_id(spec), arr, dev, timeout)

    async def _load(
        self,
        spec: ModelSpec,
        mid: bytes,
        arr: np.ndarray,
        dev: torch.device,
        timeout: float | None,  # noqa: ASYNC109 - a deadline that returns the partial hit
    ) -> LoadResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = self._writeback.match(mid, arr, self.options.chunk_tokens)  # read-your-writes
        claimed = self._prefetches.claim(prefetch_key(mid, arr, dev))
        if claimed is not None:
            result = await claimed.join(timeout)
            if result is None and not claimed.done():  # the deadline passed: what the prefetch has so far
                self._counters.loads_timed_out += 1
                self._prefetches.put_back(claimed)  # still running for whoever else awaits it
                return claimed.completed(spec, dev)
            if result is not None and (pending is None or result.num_tokens >= pending.num_tokens):
                return result
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        stream = LayerStream(self._loads, spec, mid, arr, dev, pending)
        return await stream.collect(timeout=left, fail_open=self.options.fail_open)

    def load_prefix_layers(
        self, spec: ModelSpec, tokens: TokenInput, *, device: torch.device | str = "cpu"
    ) -> LayerStream:
        """Load like ``load_prefix`` but yield ``(layer, k, v)`` in layer order as each layer completes.

        Layer 0 is usable while later layers are still in flight. Use it as
        ``async with store.load_prefix_layers(...) as layers: async for layer, k, v in layers``
        so that leaving the loop early cancels the outstanding requests at once;
        see ``LayerStream`` for what happens when a chunk turns out damaged mid-stream.
        """
        self._check_open()
        spec = _check_spec(spec)
        dev = _device(device)
        mid, arr = model_id(spec), normalize_tokens(tokens)
        pending = self._writeback.match(mid, arr, self.options.chunk_tokens)
        return LayerStream(self._loads, spec, mid, arr, dev, pending, split=True)

    def has_prefetch(self, spec: ModelSpec, tokens: TokenInput, *, device: torch.device | str = "cpu") -> bool:
        """Whether a prefetch of exactly these tokens and device waits to be claimed by ``load_prefix``."""
        return prefetch_key(model_id(_check_spec(spec)), normalize_tokens(tokens), _device(device)) in self._prefetches

    def prefetch(self, spec: ModelSpec, tokens: TokenInput, *, device: torch.device | str = "cpu") -> PrefetchHandle:
        """Start loading the cached prefix of ``tokens`` in the background; return at once.

        The handle is awaitable (the ``LoadResult``), cancellable and reports
        progress. The next ``load_prefix`` of the same tokens and device claims the
        result (or joins the work in flight) instead of loading again. Unclaimed
        prefetches are held within ``StoreOptions.prefetch_budget`` bytes; the
        oldest are dropped (cancelled if running) to make room. Needs a running loop.
        """
        self._check_open()
        spec = _check_spec(spec)
        dev = _device(device)
        arr = normalize_tokens(tokens)
        mid = model_id(spec)
        bound = spec.bytes_per_token * len(arr)  # the hit is never longer than the tokens
        pending = self._writeback.match(mid, arr, self.options.chunk_tokens)
        return self._prefetches.start(
            prefetch_key(mid, arr, dev), bound, lambda: LayerStream(self._loads, spec, mid, arr, dev, pending)
        )

    # ------------------------------------------------------------------ models

    async def models(self) -> list[ModelInfo]:
        """Every model version saved in this store with its status (live or retired), by name and version."""
        self._check_open()
        return list((await self._registry()).models)

    async def retire(
        self, name: str, version: str, *, by: str | None = None, reason: str | None = None
    ) -> list[ModelInfo]:
        """Retire model version ``name@version``: the GC collects its chunks and saves under it fail.

        Every model record with that name and version is retired (specs differing
        in layout share them). ``by`` defaults to ``user@host``. Retiring again is
        a no-op that returns the first retirement. Final: there is no un-retire.
        """
        self._check_open()
        if not isinstance(name, str) or not isinstance(version, str):
            raise InvalidInputError("retire: name and version must be strings")
        registry = await self._registry()
        retired = await retire_models(self._backend, registry, name, version, by=by, reason=reason)
        for m in retired:
            self._live_checked.pop(m.model_id, None)
        return retired

    async def _registry(self) -> Registry:
        listing = [m.key for m in await self._requests.list(MODELS_DIR + "/")]
        return await read_registry(self._backend, listing=listing, get=self._requests.get)

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Finish background saves, cancel prefetches, release the backend. Idempotent.

        Raises WriteBackError (after closing) when a background save failed.
        """
        if not self._closed:
            try:
                await self._writeback.flush()
            finally:
                self._closed = True
                try:
                    await self._prefetches.close()
                finally:
                    try:
                        if self._access is not None:
                            await self._access.close()  # the last batch of access records; never raises
                    finally:
                        self._stagings.clear()
                        await self._backend.close()

    async def __aenter__(self) -> KVStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _presence(seen: dict[int, ObjectMeta | None], i: int) -> bool | None:
    """Whether chunk ``i`` was HEADed present, absent, or not HEADed (None)."""
    return None if i not in seen else seen[i] is not None
