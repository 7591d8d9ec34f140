"""kvstore: the KV cache of LLM inference as a durable, shared, object-store-native asset.

    async with kvstore.open("s3://bucket/kv") as store:
        await store.save_prefix(spec, tokens, kv)
        hit = await store.load_prefix(spec, tokens)

``kvstore.sync`` offers the same calls for code without an event loop.
"""

from __future__ import annotations

from kvstore import sync
from kvstore.errors import (
    CircuitOpenError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    KVStoreError,
    ModelRetiredError,
    ObjectNotFoundError,
    StorageError,
    StoreConfigError,
    StorePermissionError,
    StoreUnavailableError,
    WriteBackError,
)
from kvstore.formats import FORMAT_VERSION
from kvstore.loading import LayerStream
from kvstore.opening import open
from kvstore.prefetch import PrefetchHandle
from kvstore.results import LoadResult, ModelInfo, SaveResult, StoreStats
from kvstore.spec import ModelSpec
from kvstore.storage.resilient import RetryPolicy
from kvstore.store import DEFAULT_CHUNK_TOKENS, KVStore, StoreOptions
from kvstore.sync import SyncStore
from kvstore.writeback import SaveHandle

__version__ = "0.1.0"

__all__ = [
    "CircuitOpenError",
    "DEFAULT_CHUNK_TOKENS",
    "FORMAT_VERSION",
    "FormatVersionError",
    "IntegrityError",
    "InvalidInputError",
    "KVStore",
    "KVStoreError",
    "LayerStream",
    "LoadResult",
    "ModelInfo",
    "ModelRetiredError",
    "ModelSpec",
    "ObjectNotFoundError",
    "PrefetchHandle",
    "RetryPolicy",
    "SaveHandle",
    "SaveResult",
    "StorageError",
    "StoreConfigError",
    "StoreOptions",
    "StorePermissionError",
    "StoreStats",
    "StoreUnavailableError",
    "SyncStore",
    "WriteBackError",
    "__version__",
    "open",
    "sync",
]
