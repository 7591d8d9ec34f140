"""``StoreCollector``: one open store's counters as Prometheus metrics, read at each scrape.

The collector holds no state of its own: every scrape takes a snapshot of
``store.stats()`` (cumulative counters) and ``store.request_stats()``
(per-operation requests and latency, the circuit, the background queues) and
turns it into metric families. Scrapes run in the exporter's thread; the
snapshots only read counters, so they never wait for the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.results import RequestStats, StoreStats
from kvstore.storage.instrumented import LATENCY_BUCKETS, OPERATIONS, OperationStats

__all__ = ["StatsSource", "StoreCollector"]

Samples = Iterable[tuple[Sequence[str], float]]

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    # (metric, StoreStats field, help): the counters without labels
    ("kvstore_chunks_written_total", "chunks_written", "Chunks written by saves."),
    ("kvstore_chunks_deduplicated_total", "chunks_skipped", "Chunks saves found stored already and skipped."),
    (
        "kvstore_damaged_chunks_total",
        "chunks_damaged",
        "Chunks found damaged by loads: each ended a hit early, none was returned.",
    ),
    (
        "kvstore_read_errors_total",
        "read_errors",
        "Loads and lookups that met a store failure and returned a shorter hit (fail open).",
    ),
    ("kvstore_loads_timed_out_total", "loads_timed_out", "Loads that returned what was complete at their timeout."),
    (
        "kvstore_shared_reads_total",
        "reads_shared",
        "Chunks a load took from another load's read in flight instead of its own request.",
    ),
    (
        "kvstore_cache_rereads_total",
        "cache_rereads",
        "Chunks whose cache-tier copy failed verification and were read again from the source.",
    ),
    (
        "kvstore_memory_tier_evictions_total",
        "memory_evictions",
        "Objects the host-memory tier evicted to stay within memory_cache_bytes.",
    ),
    (
        "kvstore_disk_tier_evictions_total",
        "disk_evictions",
        "Copies the disk tier removed, least recently used first, to stay within disk_cache_bytes.",
    ),
    (
        "kvstore_access_records_written_total",
        "access_records_written",
        "Access records (batches of chunk uses) written.",
    ),
    (
        "kvstore_access_flush_failures_total",
        "access_flush_failures",
        "Access-record writes that failed; their entries wait for the next flush.",
    ),
    (
        "kvstore_access_entries_dropped_total",
        "access_entries_dropped",
        "Chunk uses not recorded because a batch was full.",
    ),
    ("kvstore_request_retries_total", "retries", "Requests sent again after a transient failure."),
    ("kvstore_request_timeouts_total", "timeouts", "Request attempts that hit the per-request timeout."),
    ("kvstore_request_failures_total", "failures", "Requests that failed after all their attempts."),
    ("kvstore_circuit_breaker_opened_total", "circuit_opened", "Times the circuit breaker opened."),
    (
        "kvstore_circuit_breaker_rejected_total",
        "fast_failures",
        "Requests refused at once while the circuit was open.",
    ),
    (
        "kvstore_pinned_buffer_reuses_total",
        "pinned_reuses",
        "Pinned buffers served from the pool instead of a new allocation.",
    ),
    (
        "kvstore_pinned_overflows_total",
        "pinned_overflows",
        "CUDA copies that found the pinned pool full and went through pageable memory.",
    ),
)

_NOW: tuple[tuple[str, str, str, str], ...] = (
    # (metric, type, RequestStats field, help): what the background queues hold now, and prefetch counts
    (
        "kvstore_writeback_queue_bytes",
        "gauge",
        "writeback_bytes",
        "Bytes of KV held by background saves not uploaded yet (bounded by writeback_budget).",
    ),
    ("kvstore_writeback_queue_saves", "gauge", "writeback_saves", "Background saves not finished yet."),
    (
        "kvstore_prefetch_buffer_bytes",
        "gauge",
        "prefetch_bytes",
        "Bytes charged by prefetches no load has claimed yet (bounded by prefetch_budget).",
    ),
    ("kvstore_prefetch_buffer_prefetches", "gauge", "prefetches_held", "Prefetches no load has claimed yet."),
    ("kvstore_prefetches_started_total", "counter", "prefetches_started", "Prefetches started."),
    (
        "kvstore_prefetches_claimed_total",
        "counter",
        "prefetches_claimed",
        "Prefetches a load_prefix joined instead of loading again.",
    ),
    (
        "kvstore_prefetches_dropped_total",
        "counter",
        "prefetches_dropped",
        "Prefetches dropped for the prefetch budget (evicted oldest first, or too large to start).",
    ),
    ("kvstore_circuit_breaker_open", "gauge", "circuit_open", "1 while the circuit breaker skips the store, else 0."),
)


class StatsSource(Protocol):
    """What the collector reads: a ``KVStore`` or a ``kvstore.sync.SyncStore``."""

    def stats(self) -> StoreStats: ...

    def request_stats(self) -> RequestStats: ...


class StoreCollector(Collector):
    """Prometheus collector over one store: register it in any registry (``registry.register(...)``).

    The metric names, types and labels are listed in the README's "Metrics"
    section; every name starts with ``kvstore_``.
    """

    def __init__(self, store: StatsSource) -> None:
        self._store = store

    def describe(self) -> list[Metric]:
        """The families a scrape yields (so a registry can refuse duplicate names at ``register``)."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        s = self._store.stats()
        r = self._store.request_stats()
        ops = {op: r.operations.get(op, OperationStats()) for op in OPERATIONS}
        yield from _labelled(s, ops)
        yield _latency(ops)
        for name, field, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(s, field))
        for name, kind, field, doc in _NOW:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=float(getattr(r, field)))
        yield GaugeMetricFamily(
            "kvstore_pinned_memory_bytes",
            "Pinned host memory held for CUDA copies (bounded by pinned_pool_bytes).",
            value=s.pinned_bytes,
        )
        yield GaugeMetricFamily(
            "kvstore_disk_tier_used_bytes",
            "Bytes of cached copies in the local-disk tier (bounded by disk_cache_bytes).",
            value=s.disk_used_bytes,
        )


def _counter(name: str, doc: str, labels: Sequence[str], samples: Samples) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _labelled(s: StoreStats, ops: dict[str, OperationStats]) -> Iterator[Metric]:
    """The counters with labels: calls, hits and misses, bytes per direction and tier, requests per operation."""
    yield _counter(
        "kvstore_calls_total",
        "Store calls by kind (a prefetch and load_prefix_layers count as loads).",
        ["call"],
        [(["save"], s.saves), (["load"], s.loads), (["lookup"], s.lookups)],
    )
    yield _counter(
        "kvstore_load_tokens_total",
        "Tokens that loads asked for, by result: hit (served from the cache) or miss.",
        ["result"],
        [(["hit"], s.load_tokens_hit), (["miss"], s.load_tokens - s.load_tokens_hit)],
    )
    yield _counter(
        "kvstore_load_chunks_total",
        "Chunks that loads' queries span, by result: hit (served from the cache) or miss.",
        ["result"],
        [(["hit"], s.load_chunks_hit), (["miss"], s.load_chunks - s.load_chunks_hit)],
    )
    yield _counter(
        "kvstore_chunk_bytes_total",
        "Stored bytes of the chunks saves wrote (write) and loads read (read).",
        ["direction"],
        [(["read"], s.bytes_read), (["write"], s.bytes_written)],
    )
    yield _counter(
        "kvstore_object_bytes_total",
        "Object bytes moved, by tier (memory, disk, source: the object store) and direction.",
        ["tier", "direction"],
        [
            (["memory", "read"], s.memory_bytes),
            (["disk", "read"], s.disk_bytes),
            (["source", "read"], ops["get"].bytes + ops["get_range"].bytes),
            (["source", "write"], ops["put"].bytes),
        ],
    )
    yield _counter(
        "kvstore_tier_reads_total",
        "Object reads by the tier that served them (only with cache tiers: memory_cache_bytes, cache_url).",
        ["tier"],
        [(["memory"], s.memory_hits), (["disk"], s.disk_hits), (["source"], s.source_reads)],
    )
    yield _counter(
        "kvstore_tier_read_seconds_total",
        "Time spent reading from the disk tier and from the source behind the cache tiers.",
        ["tier"],
        [(["disk"], s.disk_seconds), (["source"], s.source_seconds)],
    )
    yield _counter(
        "kvstore_requests_total",
        "Requests that reached the object store (every attempt; cache-tier hits are not requests), by operation.",
        ["operation"],
        [([op], o.count + o.cancelled) for op, o in ops.items()],
    )
    yield _counter(
        "kvstore_request_errors_total",
        "Requests the object store failed or refused (not a missing object), by operation.",
        ["operation"],
        [([op], o.errors) for op, o in ops.items()],
    )
    yield _counter(
        "kvstore_requests_cancelled_total",
        "Requests abandoned before an answer (per-request timeout, cancelled load), by operation.",
        ["operation"],
        [([op], o.cancelled) for op, o in ops.items()],
    )


def _latency(ops: dict[str, OperationStats]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "kvstore_request_duration_seconds",
        "Latency of requests to the object store that ended (answer or error), by operation.",
        labels=["operation"],
    )
    for op, o in ops.items():
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), o.bucket_counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        family.add_metric([op], buckets, sum_value=o.seconds)
    return family
