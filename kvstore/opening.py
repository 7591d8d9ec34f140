"""Opening a store: ``kvstore.open`` and the root record that fixes a store's settings."""

from __future__ import annotations

import os
from collections.abc import Generator
from types import TracebackType
from typing import Any, TypedDict

from kvstore.errors import IntegrityError, InvalidInputError, ObjectNotFoundError, StoreConfigError
from kvstore.formats.codecs import DEFAULT_CODEC
from kvstore.formats.layout import ROOT_RECORD
from kvstore.formats.records import RootRecord
from kvstore.gpu.staging import DEFAULT_PINNED_POOL_BYTES
from kvstore.storage import ObjectStore, open_object_store
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy
from kvstore.storage.tiers import TieredObjectStore
from kvstore.store import DEFAULT_CHUNK_TOKENS, KVStore, StoreOptions

__all__ = ["DEFAULT_RETRY", "NAMESPACES_DIR", "OpenOptions", "namespace_url", "open"]

NAMESPACES_DIR = "namespaces"
_NAMESPACE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

DEFAULT_RETRY = RetryPolicy()


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
    pinned_pool_bytes: int


class _Opening:
    """What ``kvstore.open`` returns: await it, or use it as ``async with``."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None,
        overrides: dict[str, Any],
        create: bool,
        retry: RetryPolicy | None,
        tiers: tuple[int, str | os.PathLike[str] | None],
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
    codec: str = DEFAULT_CODEC,
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
    pinned_pool_bytes: int = DEFAULT_PINNED_POOL_BYTES,
) -> _Opening:
    """Open the store at ``url``: a path, ``file://``, ``memory://``, ``s3://``, ...

    A store that does not exist yet is created unless ``create`` is false.
    ``chunk_tokens`` is recorded when the store is created; None accepts the
    store's value (256 for a new store), and a different value is an error.
    ``retry`` sets retries, per-request timeouts and the circuit breaker around
    every request (None: each request is tried once, without a timeout).
    ``namespace`` opens the tenant store ``<url>/namespaces/<namespace>``: a
    key prefix of its own (for bucket policies and lifecycle rules) whose
    chunks are never shared with, or visible from, another namespace.
    ``memory_cache_bytes`` puts a host-memory LRU of that many bytes of objects in
    front of the store, and ``cache_url`` a local-disk tier (e.g. an NVMe
    directory in front of ``s3://``); reads fill them, writes go through to the
    store first, and ``stats()`` counts hits per tier.
    ``pinned_pool_bytes`` bounds the pinned host memory used to stage copies to
    and from CUDA devices (1 GiB; allocated on first use and reused; 0 disables
    pinning). See docs/GPU.md.
    """
    if isinstance(memory_cache_bytes, bool) or not isinstance(memory_cache_bytes, int) or memory_cache_bytes < 0:
        raise InvalidInputError(f"memory_cache_bytes must be an int >= 0, got {memory_cache_bytes!r}")
    url = namespace_url(url, namespace)
    tiers = (memory_cache_bytes, None if cache_url is None else namespace_url(cache_url, namespace))
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
    }
    StoreOptions(**{**overrides, "chunk_tokens": DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens})
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
    tiers: tuple[int, str | os.PathLike[str] | None] = (0, None),
) -> KVStore:
    backend = await open_object_store(url, storage_options)
    if retry is not None:
        backend = ResilientObjectStore(backend, retry)
    memory_budget, cache_url = tiers
    if memory_budget or cache_url is not None:
        disk = None if cache_url is None else await open_object_store(cache_url)
        backend = TieredObjectStore(backend, memory_budget=memory_budget, disk=disk)
    try:
        root = await _read_or_create_root(backend, overrides["chunk_tokens"], create)
    except BaseException:
        await backend.close()
        raise
    return KVStore(backend, StoreOptions(**{**overrides, "chunk_tokens": root.chunk_tokens}))


async def _read_or_create_root(backend: ObjectStore, chunk_tokens: int | None, create: bool) -> RootRecord:
    try:
        root = RootRecord.from_msgpack(await backend.get(ROOT_RECORD))
    except ObjectNotFoundError:
        if not create:
            raise StoreConfigError(
                f"{backend.url}: no kvstore store here (open with create=True to make one)"
            ) from None
        created = RootRecord(DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens)
        if await backend.put(ROOT_RECORD, created.to_msgpack(), create_only=True):
            return created
        root = RootRecord.from_msgpack(await backend.get(ROOT_RECORD))  # another process created it first
    except IntegrityError as exc:
        raise IntegrityError(f"{backend.url}: the root record is damaged: {exc}") from exc
    if chunk_tokens is not None and chunk_tokens != root.chunk_tokens:
        raise StoreConfigError(
            f"{backend.url} was created with chunk_tokens={root.chunk_tokens}; cannot open it with {chunk_tokens}"
        )
    return root
