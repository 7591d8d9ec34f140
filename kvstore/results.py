"""Value types returned by the store's calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kvstore.spec import ModelSpec
from kvstore.storage.instrumented import OperationStats

__all__ = ["LayerKV", "LoadResult", "ModelInfo", "RequestStats", "SaveResult", "StoreStats"]

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (K, V), each ``[tokens, num_kv_heads, head_dim]``."""


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What a save did. ``num_tokens``: tokens of this prompt the store now covers."""

    num_tokens: int
    chunks_written: int
    chunks_skipped: int
    bytes_written: int
    objects_written: int


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A load's hit: the longest cached prefix of the tokens and its KV.

    ``kv`` holds ``num_layers`` (K, V) pairs of shape ``[num_tokens, H, D]``;
    ``chunks_damaged`` counts chunks that failed verification and cut the hit short.
    """

    num_tokens: int
    kv: tuple[LayerKV, ...]
    chunks_loaded: int
    chunks_damaged: int
    bytes_read: int

    @property
    def hit(self) -> bool:
        return self.num_tokens > 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Cumulative counters of one open store."""

    saves: int
    loads: int
    lookups: int
    chunks_written: int
    chunks_skipped: int
    chunks_loaded: int
    chunks_damaged: int
    bytes_written: int
    bytes_read: int
    requests_get: int
    requests_put: int
    requests_head: int
    requests_delete: int
    requests_list: int
    read_errors: int = 0
    """Loads and lookups that met a store failure and returned a shorter hit (fail open)."""
    loads_timed_out: int = 0
    """Loads that returned what was complete at their ``timeout``."""
    reads_shared: int = 0
    """Chunks a load got from another load's read in flight instead of its own request."""
    cache_rereads: int = 0
    """Chunks whose cache-tier copy failed verification and were read again from the source."""
    retries: int = 0
    """Requests sent again after a transient failure (see ``RetryPolicy``)."""
    failures: int = 0
    """Requests that failed after all their attempts."""
    timeouts: int = 0
    """Request attempts that hit the per-request timeout."""
    fast_failures: int = 0
    """Requests refused at once while the circuit was open."""
    circuit_opened: int = 0
    memory_hits: int = 0
    """Object reads served by the host-memory tier (``memory_cache_bytes``)."""
    memory_bytes: int = 0
    disk_hits: int = 0
    """Object reads served by the local-disk tier (``cache_url``)."""
    disk_bytes: int = 0
    disk_seconds: float = 0.0
    source_reads: int = 0
    """Object reads that reached the source of truth behind the cache tiers (0 without tiers)."""
    source_bytes: int = 0
    source_seconds: float = 0.0
    memory_evictions: int = 0
    disk_used_bytes: int = 0
    """Bytes of cached copies in the local-disk tier (``disk_cache_bytes`` bounds it)."""
    disk_evictions: int = 0
    """Copies the disk tier removed, least recently used first, to stay within its budget."""
    pinned_bytes: int = 0
    """Pinned host memory held for CUDA copies (``pinned_pool_bytes`` caps it; 0 before the first CUDA call)."""
    pinned_reuses: int = 0
    """Pinned buffers served from the pool instead of a new allocation."""
    pinned_overflows: int = 0
    """Copies that found the pool full and went through pageable memory."""
    load_tokens: int = 0
    """Tokens that loads which returned a result asked for (their query's length)."""
    load_tokens_hit: int = 0
    """Of ``load_tokens``, those served from the cache; the rest are misses."""
    load_chunks: int = 0
    """Chunks those queries span (``ceil(tokens / chunk_tokens)`` per load)."""
    load_chunks_hit: int = 0
    """Of ``load_chunks``, those the hits covered."""
    access_records_written: int = 0
    """Access records (batches of chunk uses, for the GC's eviction by recency) written."""
    access_flush_failures: int = 0
    """Access-record writes that failed (logged; their entries wait for the next flush)."""
    access_entries_dropped: int = 0
    """Chunk uses not recorded because a batch was full (its writes kept failing)."""

    @property
    def tier_hit_rate(self) -> float:
        """Share of object reads served by a cache tier (0 without tiers)."""
        total = self.memory_hits + self.disk_hits + self.source_reads
        return (self.memory_hits + self.disk_hits) / total if total else 0.0


@dataclass(frozen=True, slots=True)
class RequestStats:
    """Requests to the object store by operation, and the background work queued behind them, now.

    ``operations`` maps every operation (get, get_range, put, head, list,
    delete) to its counts and latency histogram: each attempt that reached the
    store, under retries and cache tiers. ``circuit_open`` is the circuit
    breaker's state (False without retries). The write-back and prefetch
    figures are what is held at this moment, plus cumulative prefetch counts.
    """

    operations: Mapping[str, OperationStats]
    circuit_open: bool = False
    writeback_bytes: int = 0
    """Bytes of KV held by background saves not yet uploaded (bounded by ``writeback_budget``)."""
    writeback_saves: int = 0
    prefetch_bytes: int = 0
    """Bytes charged by prefetches nobody has claimed yet (bounded by ``prefetch_budget``)."""
    prefetches_held: int = 0
    prefetches_started: int = 0
    prefetches_claimed: int = 0
    """Prefetches a ``load_prefix`` took over instead of loading again."""
    prefetches_dropped: int = 0
    """Prefetches dropped for the budget: evicted oldest-first, or too large to start."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model version the store has seen, and whether it is live or retired.

    ``spec``, ``model_id`` and ``created`` come from its model record; the
    ``retired_*`` fields from its retirement record (None while it is live).
    """

    model_id: bytes
    spec: ModelSpec
    created: float
    retired_at: float | None = None
    retired_by: str | None = None
    reason: str | None = None

    @property
    def retired(self) -> bool:
        return self.retired_at is not None

    @property
    def status(self) -> str:
        """``"live"`` or ``"retired"``."""
        return "retired" if self.retired else "live"

    @property
    def label(self) -> str:
        return self.spec.label
