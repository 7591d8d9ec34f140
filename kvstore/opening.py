"""Opening a store: ``kvstore.open`` and the root record that fixes a store's settings."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypedDict

from kvstore.errors import IntegrityError, InvalidInputError, ObjectNotFoundError, StoreConfigError
from kvstore.formats.codecs import DEFAULT_CODEC
from kvstore.formats.layout import ROOT_RECORD, is_cacheable
from kvstore.formats.records import RootRecord
from kvstore.gpu.staging import DEFAULT_PINNED_POOL_BYTES
from kvstore.storage import ObjectStore, open_object_store
from kvstore.storage.disk_tier import DEFAULT_DISK_CACHE_BYTES, DiskTier, cache_dir, source_identity
from kvstore.storage.instrumented import InstrumentedObjectStore
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy
from kvstore.storage.tiers import TieredObjectStore
from kvstore.store import DEFAULT_CHUNK_TOKENS, KVStore, StoreOptions

__all__ = ["DEFAULT_RETRY", "NAMESPACES_DIR", "OpenOptions", "namespace_url", "open"]

NAMESPACES_DIR = "namespaces"
_NAMESPACE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

DEFAULT_RETRY = RetryPolicy()
_STORE_DEFAULTS = StoreOptions()


class OpenOptions(TypedDict, total=False):
    """The keyword arguments of ``open``, for wrappers that pass them on (``kvstore.sync.open``)."""

    storage_options: dict[str, Any] | None
    chunk_tokens: int | None
    codec: str
    max_concurrency: int
    verify: bool
    save_tail: bool
    repair: bool
    fail_open: bool
    create: bool
    retry: RetryPolicy | None
    namespace: str | None
    memory_cache_bytes: int
    cache_url: str | os.PathLike[str] | None
    disk_cache_bytes: int
    pinned_pool_bytes: int
    writeback_budget: int
    prefetch_budget: int
    record_access: bool
    access_flush_interval: float


class _TierOptions(NamedTuple):
    """The cache tiers ``open`` puts in front of the store."""

    memory_bytes: int = 0
    cache_dir: Path | None = None
    disk_bytes: int = DEFAULT_DISK_CACHE_BYTES


class _Opening:
    """What ``kvstore.open`` returns: await it, or use it as ``async with``."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None,
        overrides: dict[str, Any],
        create: bool,
        retry: RetryPolicy | None,
        tiers: _TierOptions,
    ):
        self._url = url
        self._storage_options = storage_options
        self._overrides = overrides
        self._create = create
        self._retry = retry
        self._tiers = tiers
        self._store: KVStore | None = None

    def __await__(self) -> Generator[Any, None, KVStore]:
        return _open_store(
            self._url, self._storage_options, self._overrides, self._create, self._retry, self._tiers
        ).__await__()

    async def __aenter__(self) -> KVStore:
        self._store = await self
        return self._store

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._store is not None:
            await self._store.close()


def open(  # noqa: A001 - the public name the API promises
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    chunk_tokens: int | None = None,
    codec: str | None = None,
    max_concurrency: int = 32,
    verify: bool = True,
    save_tail: bool = True,
    repair: bool = True,
    fail_open: bool = True,
    create: bool = True,
    retry: RetryPolicy | None = DEFAULT_RETRY,
    namespace: str | None = None,
    memory_cache_bytes: int = 0,
    cache_url: str | os.PathLike[str] | None = None,
    disk_cache_bytes: int = DEFAULT_DISK_CACHE_BYTES,
    pinned_pool_bytes: int = DEFAULT_PINNED_POOL_BYTES,
    writeback_budget: int = _STORE_DEFAULTS.writeback_budget,
    prefetch_budget: int = _STORE_DEFAULTS.prefetch_budget,
    record_access: bool = _STORE_DEFAULTS.record_access,
    access_flush_interval: float = _STORE_DEFAULTS.access_flush_interval,
) -> _Opening:
    """Open the store at ``url``: a path, ``file://``, ``memory://``, ``s3://``, ...

    A store that does not exist yet is created unless ``create`` is false.
    ``chunk_tokens`` and ``codec`` are recorded when the store is created; None
    accepts the store's value (256 tokens and ``"none"`` for a new store), and a
    different value is an error.
    ``retry`` sets retries, per-request timeouts and the circuit breaker around
    every request (None: each request is tried once, without a timeout).
    ``namespace`` opens the tenant store ``<url>/namespaces/<namespace>``: a
    key prefix of its own (for bucket policies and lifecycle rules) whose
    chunks are never shared with, or visible from, another namespace.
    ``memory_cache_bytes`` puts a host-memory LRU of that many bytes of objects in
    front of the store, and ``cache_url`` a local-disk tier (e.g. an NVMe
    directory in front of ``s3://``) of at most ``disk_cache_bytes`` (10 GiB;
    least recently used copies go first) in a subdirectory of its own per
    store; reads fill them, writes go through to the store first, and
    ``stats()`` counts hits per tier. Only chunk data is cached: records that
    can change are always read from the store.
    ``pinned_pool_bytes`` bounds the pinned host memory used to stage copies to
    and from CUDA devices (1 GiB; allocated on first use and reused; 0 disables
    pinning). See docs/GPU.md.
    ``writeback_budget`` bounds the bytes of KV that background saves
    (``save_prefix(wait=False)``) hold (1 GiB; past it a save waits), and
    ``prefetch_budget`` those of unclaimed prefetches (1 GiB; the oldest are dropped).
    ``record_access`` records which chunks loads, lookups and saves use, in
    memory, written as one access record per model version every
    ``access_flush_interval`` seconds (30), when a batch is full and on
    ``close()``: the recency ``kvstore gc --max-bytes / --max-idle`` evicts by.
    """
    for name, value in (("memory_cache_bytes", memory_cache_bytes), ("disk_cache_bytes", disk_cache_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"{name} must be an int >= 0, got {value!r}")
    url = namespace_url(url, namespace)
    # The disk tier keeps a subdirectory per store (namespaces included): cache_url itself is shared.
    tiers = _TierOptions(memory_cache_bytes, None if cache_url is None else cache_dir(cache_url), disk_cache_bytes)
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidInputError(f"retry must be a kvstore.RetryPolicy or None, got {type(retry).__name__}")
    overrides: dict[str, Any] = {
        "chunk_tokens": chunk_tokens,
        "codec": codec,
        "max_concurrency": max_concurrency,
        "verify": verify,
        "save_tail": save_tail,
        "repair": repair,
        "fail_open": fail_open,
        "pinned_pool_bytes": pinned_pool_bytes,
        "writeback_budget": writeback_budget,
        "prefetch_budget": prefetch_budget,
        "record_access": record_access,
        "access_flush_interval": access_flush_interval,
    }
    StoreOptions(
        **{
            **overrides,
            "chunk_tokens": DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens,
            "codec": DEFAULT_CODEC if codec is None else codec,
        }
    )
    return _Opening(url, storage_options, overrides, create, retry, tiers)


def namespace_url(url: str | os.PathLike[str], namespace: str | None) -> str | os.PathLike[str]:
    """The URL of ``namespace``'s store under ``url`` (``url`` itself for None).

    Names are 1-64 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..``: they
    become one path segment, safe in every backend and in IAM policy ARNs.
    """
    if namespace is None:
        return url
    if (
        not isinstance(namespace, str)
        or not 0 < len(namespace) <= 64
        or not set(namespace) <= _NAMESPACE_CHARS
        or namespace in (".", "..")
    ):
        raise InvalidInputError(f"namespace must be 1-64 characters of [A-Za-z0-9._-], got {namespace!r}")
    return f"{os.fspath(url).rstrip('/')}/{NAMESPACES_DIR}/{namespace}"


async def _open_store(
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None,
    overrides: dict[str, Any],
    create: bool,
    retry: RetryPolicy | None,
    tiers: _TierOptions,
) -> KVStore:
    backend: ObjectStore = InstrumentedObjectStore(await open_object_store(url, storage_options))
    if retry is not None:
        backend = ResilientObjectStore(backend, retry)
    try:
        if tiers.memory_bytes or tiers.cache_dir is not None:
            disk = None
            if tiers.cache_dir is not None:
                source = source_identity(backend.url, storage_options)
                disk = await DiskTier.open(tiers.cache_dir, source, tiers.disk_bytes)
            backend = TieredObjectStore(backend, cacheable=is_cacheable, memory_budget=tiers.memory_bytes, disk=disk)
        root = await _read_or_create_root(backend, overrides["chunk_tokens"], overrides["codec"], create)
    except BaseException:
        await backend.close()
        raise
    return KVStore(backend, StoreOptions(**{**overrides, "chunk_tokens": root.chunk_tokens, "codec": root.codec}))


async def _read_or_create_root(
    backend: ObjectStore, chunk_tokens: int | None, codec: str | None, create: bool
) -> RootRecord:
    try:
        root = RootRecord.from_msgpack(await backend.get(ROOT_RECORD))
    except ObjectNotFoundError:
        if not create:
            raise StoreConfigError(
                f"{backend.url}: no kvstore store here (open with create=True to make one)"
            ) from None
        created = RootRecord(
            DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens, DEFAULT_CODEC if codec is None else codec
        )
        if await backend.put(ROOT_RECORD, created.to_msgpack(), create_only=True):
            return created
        root = RootRecord.from_msgpack(await backend.get(ROOT_RECORD))  # another process created it first
    except IntegrityError as exc:
        raise IntegrityError(f"{backend.url}: the root record is damaged: {exc}") from exc
    if chunk_tokens is not None and chunk_tokens != root.chunk_tokens:
        raise StoreConfigError(
            f"{backend.url} was created with chunk_tokens={root.chunk_tokens}; cannot open it with {chunk_tokens}"
        )
    if codec is not None and codec != root.codec:
        raise StoreConfigError(f"{backend.url} was created with codec={root.codec!r}; cannot open it with {codec!r}")
    return root
