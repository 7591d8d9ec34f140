"""KVStore: save, look up and load KV-cache prefixes as content-addressed chunks.

Every object request of a call runs concurrently under one per-store limit
(``max_concurrency``); CPU work (encoding, hashing, copying) runs in worker
threads so the event loop never stalls on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, overload

import blake3
import numpy as np
import torch

from kvstore._tasks import run_all
from kvstore.errors import (
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    ModelRetiredError,
    ObjectNotFoundError,
    StoreUnavailableError,
)
from kvstore.fetching import SharedReads
from kvstore.formats.codecs import DEFAULT_CODEC, Codec, get_codec
from kvstore.formats.dtypes import dtype_info
from kvstore.formats.keys import ChunkKey, TokenInput, chunk_keys, model_id, next_key, normalize_tokens
from kvstore.formats.layout import (
    MODELS_DIR,
    ZARR_JSON,
    chunk_prefix,
    commit_path,
    layer_path,
    model_record_path,
    parse_tail_marker,
    retirement_record_path,
    tails_prefix,
    zarr_array_metadata,
)
from kvstore.formats.records import CommitRecord, ModelRecord
from kvstore.gpu.staging import DEFAULT_PINNED_POOL_BYTES, Stagings
from kvstore.loading import LayerStream, LoadState
from kvstore.prefetch import PrefetchBuffer, PrefetchHandle, prefetch_key
from kvstore.registry import Registry, read_registry, retire_models
from kvstore.results import LayerKV, LoadResult, ModelInfo, SaveResult, StoreStats
from kvstore.spec import ModelSpec
from kvstore.storage import ObjectStore
from kvstore.storage.resilient import RetryStats
from kvstore.storage.tiers import TierStats
from kvstore.tensors import byte_view, check_kv, empty_kv
from kvstore.writeback import SaveHandle, WriteBack

__all__ = ["DEFAULT_CHUNK_TOKENS", "KVStore", "StoreOptions"]

logger = logging.getLogger("kvstore")

DEFAULT_CHUNK_TOKENS = 256

LIVE_CHECK_TTL = 60.0
"""Seconds a store trusts that a model version is not retired before checking again (one HEAD)."""

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Per-store settings. ``chunk_tokens`` is fixed when the store is created."""

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    codec: str = DEFAULT_CODEC
    max_concurrency: int = 32
    verify: bool = True
    save_tail: bool = True
    repair: bool = True
    """Delete the commit record of a chunk found damaged, so the next save rewrites it."""
    fail_open: bool = True
    """Loads and lookups turn a store failure into a (shorter) hit, logged and counted; saves always raise."""
    writeback_budget: int = 1 << 30
    """Bytes of KV that background saves (``save_prefix(wait=False)``) may hold; past it saves wait."""
    prefetch_budget: int = 1 << 30
    """Bytes of KV that unclaimed prefetches may hold; past it the oldest are dropped."""
    pinned_pool_bytes: int = DEFAULT_PINNED_POOL_BYTES
    """Pinned host memory for CUDA copies (allocated on first use, reused); past it copies use pageable memory."""

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
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int):
            raise InvalidInputError(f"chunk_tokens must be an int in [1, 2**24], got {self.chunk_tokens!r}")
        if not 1 <= self.chunk_tokens <= 1 << 24:
            raise InvalidInputError(f"chunk_tokens must be an int in [1, 2**24], got {self.chunk_tokens!r}")


@dataclass(slots=True)
class _Counters:
    saves: int = 0
    loads: int = 0
    lookups: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    chunks_loaded: int = 0
    chunks_damaged: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    requests_get: int = 0
    requests_put: int = 0
    requests_head: int = 0
    requests_delete: int = 0
    requests_list: int = 0
    read_errors: int = 0
    loads_timed_out: int = 0
    reads_shared: int = 0


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


def _digest(parts: Sequence[memoryview]) -> bytes:
    h = blake3.blake3()
    for part in parts:
        h.update(part)
    digest: bytes = h.digest()
    return digest


class KVStore:
    """An open store. Create it with ``await kvstore.open(url)``; close it with ``close()``."""

    def __init__(self, backend: ObjectStore, options: StoreOptions) -> None:
        self._backend = backend
        self.options = options
        self._codec: Codec = get_codec(options.codec)
        self._limit = asyncio.Semaphore(options.max_concurrency)
        self._counters = _Counters()
        self._known_models: set[bytes] = set()
        self._live_checked: dict[bytes, float] = {}  # model id -> monotonic time of the last retirement check
        self._prefetches = PrefetchBuffer(options.prefetch_budget)
        self._writeback = WriteBack(options.writeback_budget)
        self._stagings = Stagings(options.pinned_pool_bytes)
        self._shared_reads = SharedReads()
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
        layer: object = self._backend
        while layer is not None:  # the wrappers opening.py stacked: tiers over retries over the backend
            for counters in (getattr(layer, "stats", None), getattr(layer, "tier_stats", None)):
                if isinstance(counters, (RetryStats, TierStats)):
                    extra.update({f.name: getattr(counters, f.name) for f in fields(counters)})
            layer = getattr(layer, "source", None) or getattr(layer, "inner", None)
        pool = self._stagings.pool
        if pool is not None:
            ps = pool.stats()
            extra.update(pinned_bytes=ps.allocated_bytes, pinned_reuses=ps.reuses, pinned_overflows=ps.overflows)
        return StoreStats(**{f.name: getattr(c, f.name) for f in fields(c)}, **extra)

    # ------------------------------------------------------------------ requests

    async def _head(self, key: str) -> bool:
        async with self._limit:
            self._counters.requests_head += 1
            return await self._backend.head(key) is not None

    async def _get(self, key: str) -> bytes:
        async with self._limit:
            self._counters.requests_get += 1
            return await self._backend.get(key)

    async def _put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        async with self._limit:
            self._counters.requests_put += 1
            return await self._backend.put(key, data, create_only=create_only)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError(f"{self.url}: the store is closed")

    def _keys(self, spec: ModelSpec, tokens: np.ndarray, *, include_tail: bool) -> list[ChunkKey]:
        return chunk_keys(spec, tokens, self.options.chunk_tokens, include_tail=include_tail)

    # ------------------------------------------------------------------ lookup

    async def lookup(self, spec: ModelSpec, tokens: TokenInput) -> int:
        """Number of leading tokens whose KV is cached, without moving tensor data.

        One concurrent round of existence checks; when the chain stops short,
        one listing finds a saved partial chunk that the query extends.
        """
        self._check_open()
        spec = _check_spec(spec)
        arr = normalize_tokens(tokens)
        self._counters.lookups += 1
        mid = model_id(spec)

        async def probe(key: ChunkKey) -> bool | None:
            return True if await self._head(commit_path(chunk_prefix(mid, key.digest))) else None

        pending = self._writeback.match(mid, arr, self.options.chunk_tokens)  # read-your-writes
        held = pending.num_tokens if pending else 0
        if held == len(arr):
            return held
        try:
            hits = await self._find_chain(spec, mid, arr, probe)
        except StoreUnavailableError as exc:
            if not self.options.fail_open:
                raise
            self._counters.read_errors += 1
            logger.warning("lookup of %s failed open: %s", spec.label, exc)
            return held
        return max(held, hits[-1][0].end if hits else 0)

    async def _find_chain(
        self, spec: ModelSpec, mid: bytes, tokens: np.ndarray, probe: Callable[[ChunkKey], Awaitable[R | None]]
    ) -> list[tuple[ChunkKey, R]]:
        """The longest run of present chunks from the start, ``probe`` giving None for absent."""
        keys = self._keys(spec, tokens, include_tail=True)
        found = await run_all(probe(k) for k in keys)
        hits: list[tuple[ChunkKey, R]] = []
        for key, value in zip(keys, found, strict=True):
            if value is None:
                break
            hits.append((key, value))
        if len(hits) < len(keys):
            tail = await self._find_saved_tail(mid, tokens, keys[len(hits)], probe)
            if tail is not None:
                hits.append(tail)
        return hits

    async def _find_saved_tail(
        self, mid: bytes, tokens: np.ndarray, missed: ChunkKey, probe: Callable[[ChunkKey], Awaitable[R | None]]
    ) -> tuple[ChunkKey, R] | None:
        """A saved partial chunk shorter than ``missed``, at its position, that ``tokens`` extend."""
        async with self._limit:
            self._counters.requests_list += 1
            listing = [m.key async for m in self._backend.list(tails_prefix(mid, missed.parent))]
        lengths = sorted({n for k in listing if (n := parse_tail_marker(k)) and n < missed.num_tokens}, reverse=True)
        candidates = [next_key(missed.parent, missed.index, tokens, missed.start, missed.start + n) for n in lengths]
        for key, value in zip(candidates, await run_all(probe(c) for c in candidates), strict=True):
            if value is not None:
                return key, value
        return None

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
        await self._ensure_model_record(spec, mid)
        present = await run_all(self._head(commit_path(chunk_prefix(mid, k.digest))) for k in keys)
        # Chunks after the first missing one are rewritten, not skipped: while the chain had a gap
        # they were unreachable, and rewriting refreshes their mtime so a concurrent GC's grace
        # period protects them (see "Garbage collection" in docs/FORMAT.md).
        first_gap = present.index(False) if False in present else len(keys)
        missing = keys[first_gap:]
        written = [(0, 0)]
        if missing:
            base = missing[0].start  # copy only what is written, not the prefix already stored
            async with self._stagings.for_kv(kv).transfers() as transfers:
                host = await transfers.to_host(kv, base)
                written = await run_all(self._write_chunk(spec, mid, key, host, base) for key in missing)
        nbytes = sum(b for b, _ in written)
        nobjects = sum(n for _, n in written)
        c = self._counters
        c.chunks_written += len(missing)
        c.chunks_skipped += len(keys) - len(missing)
        c.bytes_written += nbytes
        return SaveResult(
            num_tokens=keys[-1].end,
            chunks_written=len(missing),
            chunks_skipped=len(keys) - len(missing),
            bytes_written=nbytes,
            objects_written=nobjects,
        )

    async def _ensure_model_record(self, spec: ModelSpec, mid: bytes) -> None:
        await self._check_live(spec, mid)
        if mid in self._known_models:
            return
        await self._put(model_record_path(mid), ModelRecord(mid, spec).to_msgpack(), create_only=True)
        self._known_models.add(mid)

    async def _check_live(self, spec: ModelSpec, mid: bytes) -> None:
        """Refuse saves under a retired model; a positive check is trusted for LIVE_CHECK_TTL seconds."""
        now = time.monotonic()
        if now - self._live_checked.get(mid, -LIVE_CHECK_TTL) < LIVE_CHECK_TTL:
            return
        if await self._head(retirement_record_path(mid)):
            raise ModelRetiredError(f"model {spec.label} was retired in {self.url}; save under a new version")
        self._live_checked[mid] = now

    async def _write_chunk(
        self, spec: ModelSpec, mid: bytes, key: ChunkKey, host: list[LayerKV], base: int
    ) -> tuple[int, int]:
        """Write a chunk's layers and zarr metadata, then its commit record; return (bytes, objects)."""
        prefix = chunk_prefix(mid, key.digest)
        token_bytes = spec.row_bytes
        lo, hi = (key.start - base) * token_bytes, (key.end - base) * token_bytes  # host starts at token `base`
        itemsize = dtype_info(spec.dtype).itemsize

        def parts(layer: int) -> list[memoryview]:
            k, v = host[layer]
            return [byte_view(k)[lo:hi].data, byte_view(v)[lo:hi].data]

        def encode(layer: int) -> tuple[bytes, bytes]:
            return self._codec.encode(parts(layer), itemsize), _digest(parts(layer))

        raw = self._codec.name == "none"
        # Uncompressed: hash every layer of the chunk in one worker call, then write the
        # tensor memory as is (one thread hop per layer, no concatenation copy).
        digests = await asyncio.to_thread(lambda: [_digest(parts(i)) for i in range(spec.num_layers)]) if raw else []

        async def write_layer(layer: int) -> tuple[int, bytes]:
            async with self._limit:
                self._counters.requests_put += 1
                if raw:
                    await self._backend.put_parts(layer_path(prefix, layer), parts(layer))
                    return 2 * (hi - lo), digests[layer]
                data, digest = await asyncio.to_thread(encode, layer)
                await self._backend.put(layer_path(prefix, layer), data)
            return len(data), digest

        meta = zarr_array_metadata(spec, key.num_tokens, self._codec.name)
        results = await run_all(
            [self._put(prefix + ZARR_JSON, meta), *(write_layer(i) for i in range(spec.num_layers))]
        )
        layers: list[tuple[int, bytes]] = results[1:]  # type: ignore[assignment]
        commit = CommitRecord(
            key=key.digest,
            parent=key.parent,
            index=key.index,
            model_id=mid,
            num_tokens=key.num_tokens,
            codec=self._codec.name,
            layer_sizes=tuple(size for size, _ in layers),
            layer_digests=tuple(digest for _, digest in layers),
        ).to_msgpack()
        await self._put(commit_path(prefix), commit)
        nbytes, nobjects = len(meta) + len(commit) + sum(size for size, _ in layers), spec.num_layers + 2
        if key.num_tokens < self.options.chunk_tokens:  # a tail: let longer queries find it
            await self._put(f"{tails_prefix(mid, key.parent)}{key.num_tokens}", key.digest)
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
            try:
                async with asyncio.timeout(timeout):
                    result = await claimed.join()
            except TimeoutError:
                self._counters.loads_timed_out += 1
                return LoadResult(0, empty_kv(spec, dev), 0, 0, 0)
            if result is not None and (pending is None or result.num_tokens >= pending.num_tokens):
                return result
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        stream = LayerStream(self, spec, mid, arr, dev, pending)
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
        return LayerStream(self, spec, mid, arr, dev, self._writeback.match(mid, arr, self.options.chunk_tokens))

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
            prefetch_key(mid, arr, dev), bound, lambda: LayerStream(self, spec, mid, arr, dev, pending)
        )

    async def _read_commit(self, spec: ModelSpec, mid: bytes, key: ChunkKey, state: LoadState) -> CommitRecord | None:
        """The chunk's commit record if present and valid, else None (damage is reported)."""
        try:
            data = await self._get(commit_path(chunk_prefix(mid, key.digest)))
        except ObjectNotFoundError:
            return None
        try:
            commit = CommitRecord.from_msgpack(data)
            _check_commit(commit, spec, mid, key)
        except IntegrityError as exc:
            await self._report_damage(spec, mid, key, exc, state)
            return None
        except FormatVersionError as exc:
            logger.warning("chunk %s of %s was written in another format: %s", key.hex, spec.label, exc)
            return None
        return commit

    async def _load_layer(
        self,
        spec: ModelSpec,
        mid: bytes,
        hits: list[tuple[ChunkKey, CommitRecord]],
        j: int,
        layer: int,
        dest: LayerKV,
        state: LoadState,
    ) -> None:
        key, commit = hits[j]
        token_bytes = spec.row_bytes
        kb = byte_view(dest[0])[key.start * token_bytes : key.end * token_bytes]
        vb = byte_view(dest[1])[key.start * token_bytes : key.end * token_bytes]
        path = layer_path(chunk_prefix(mid, key.digest), layer)
        expected_size = commit.layer_sizes[layer]
        digest = commit.layer_digests[layer] if self.options.verify else None
        if j >= state.first_bad:
            return
        waiter = self._shared_reads.follow(path, (kb, vb))
        if waiter is not None and await waiter:  # another load's read in flight filled our buffers
            return
        # Owner of the read, or a follower whose owner failed: read it here (unshared, so no second wait).
        owner, delivered = waiter is None, False
        try:
            size = await self._read_layer(path, commit.codec, expected_size, digest, (kb, vb), state, j)
            if size is None:
                return
            state.bytes_read += size
            if owner:
                self._counters.reads_shared += self._shared_reads.deliver(path, (kb, vb))
                delivered = True
        finally:
            if owner and not delivered:
                self._shared_reads.abandon(path)

    async def _read_layer(
        self,
        path: str,
        codec_name: str,
        expected_size: int,
        digest: bytes | None,
        dest: tuple[np.ndarray, np.ndarray],
        state: LoadState,
        j: int,
    ) -> int | None:
        """Read, verify and decode chunk ``j``'s layer object into ``dest``: its stored size.

        None when nothing was read: the hit already ends before chunk ``j``, or the
        object is damaged (recorded in ``state``, which ends the hit). Other failures raise.
        """
        kb, vb = dest
        async with self._limit:
            if j >= state.first_bad:
                return None
            self._counters.requests_get += 1
            try:
                if codec_name == "none" and self._backend.reads_into_buffers:
                    buffers = [kb.data, vb.data]

                    def check(size: int) -> None:  # in the reading thread, while the bytes are cache-hot
                        _check_size(size, expected_size)
                        if digest is not None:
                            _verify(buffers, digest)

                    return await self._backend.get_into(path, buffers, then=check)
                data = await self._backend.get(path)
                _check_size(len(data), expected_size)
                codec = get_codec(codec_name, stored=True)
                await asyncio.to_thread(_decode_into, codec, data, kb, vb, digest)
                return len(data)
            except (IntegrityError, ObjectNotFoundError) as exc:
                state.fail(j, exc)
                return None

    async def _report_damage(
        self, spec: ModelSpec, mid: bytes, key: ChunkKey, exc: BaseException | None, state: LoadState
    ) -> None:
        state.damaged += 1
        self._counters.chunks_damaged += 1
        logger.warning("damaged chunk %s (#%d of %s): %s", key.hex, key.index, spec.label, exc)
        if not self.options.repair:
            return
        try:
            async with self._limit:
                self._counters.requests_delete += 1
                await self._backend.delete([commit_path(chunk_prefix(mid, key.digest))])
        except StoreUnavailableError as err:
            logger.warning("could not retire damaged chunk %s: %s", key.hex, err)

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
        async with self._limit:
            self._counters.requests_list += 1
            listing = [m.key async for m in self._backend.list(MODELS_DIR + "/")]
        return await read_registry(self._backend, listing=listing, get=self._get)

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
                    self._stagings.clear()
                    await self._backend.close()

    async def __aenter__(self) -> KVStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _check_commit(commit: CommitRecord, spec: ModelSpec, mid: bytes, key: ChunkKey) -> None:
    if commit.key != key.digest or commit.parent != key.parent or commit.index != key.index:
        raise IntegrityError("commit record belongs to another chunk")
    if commit.model_id != mid or commit.num_tokens != key.num_tokens:
        raise IntegrityError("commit record does not match the model or the chunk's token count")
    if len(commit.layer_sizes) != spec.num_layers:
        raise IntegrityError(f"commit record lists {len(commit.layer_sizes)} layers, the model has {spec.num_layers}")
    get_codec(commit.codec, stored=True)


def _check_size(size: int, expected: int) -> None:
    if size != expected:
        raise IntegrityError(f"layer object is {size} bytes, the commit record says {expected}")


def _verify(parts: Sequence[memoryview], digest: bytes) -> None:
    if _digest(parts) != digest:
        raise IntegrityError("layer checksum mismatch")


def _decode_into(codec: Codec, data: bytes, kb: np.ndarray, vb: np.ndarray, digest: bytes | None) -> None:
    decoded = codec.decode(data, len(kb) + len(vb))
    if digest is not None:
        _verify([decoded], digest)
    kb[:] = np.frombuffer(decoded, np.uint8, len(kb))
    vb[:] = np.frombuffer(decoded, np.uint8, len(vb), len(kb))
