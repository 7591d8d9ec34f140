"""Usage scan: what a store holds per model version and per namespace (for ``kvstore ls`` and ``kvstore stats``).

One listing of the store plus a bounded sample of chunk headers per model
(for token counts and the compression ratio), so a scan of a huge store costs
its listing and a few hundred GETs. Last use comes from the listing alone: the
data objects' mtimes and the access records' names, which carry their last use.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvstore._tasks import task_group
from kvstore.errors import FormatVersionError, IntegrityError, ObjectNotFoundError, StoreConfigError
from kvstore.formats.access import ACCESS_DIR, parse_access_key
from kvstore.formats.layout import chunk_model_id, parse_chunk_object
from kvstore.formats.shard import CRC_BYTES
from kvstore.gc.report import GCProgress
from kvstore.opening import NAMESPACES_DIR
from kvstore.reading import read_head
from kvstore.registry import read_registry, read_root_record
from kvstore.results import ModelInfo
from kvstore.storage import ObjectMeta, ObjectStore

__all__ = ["ModelStats", "NamespaceStats", "UsageReport", "scan_usage"]


def _later(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(slots=True)
class ModelStats:
    """One model version's footprint. ``chunks`` counts data objects; objects and bytes count everything
    under its ``chunks/<mid>/`` (array metadata, tail markers, temporary files too)."""

    label: str
    model_id: str
    status: str
    retired_at: float | None = None
    retired_by: str | None = None
    chunks: int = 0
    objects: int = 0
    bytes: int = 0
    last_write: float | None = None
    last_use: float | None = None
    """Latest use of any of its chunks: access records (by name) and data objects' mtimes."""
    sampled_chunks: int = 0
    sampled_tokens: int = 0
    sampled_stored_bytes: int = 0
    sampled_raw_bytes: int = 0

    @property
    def compression_ratio(self) -> float | None:
        """Decoded KV bytes per stored layer byte, from the sampled chunk headers."""
        return self.sampled_raw_bytes / self.sampled_stored_bytes if self.sampled_stored_bytes else None

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["compression_ratio"] = self.compression_ratio
        return out


@dataclass(slots=True)
class NamespaceStats:
    """One namespace under the scanned store (``namespaces/<name>/``): a store of its own, summed."""

    name: str
    objects: int = 0
    bytes: int = 0
    chunks: int = 0
    last_use: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class UsageReport:
    """A store's footprint: per model version, chunk size histogram (log2 buckets of data object bytes), totals."""

    url: str
    chunk_tokens: int
    models: dict[str, ModelStats] = field(default_factory=dict)
    chunk_size_histogram: Counter[int] = field(default_factory=Counter)
    other_objects: int = 0
    other_bytes: int = 0
    access_records: int = 0
    access_bytes: int = 0
    namespaces: dict[str, NamespaceStats] = field(default_factory=dict)
    """Namespaces under this store; their objects count here, not in the store's own totals."""
    elapsed: float = 0.0

    @property
    def objects(self) -> int:
        return sum(m.objects for m in self.models.values()) + self.other_objects + self.access_records

    @property
    def bytes(self) -> int:
        return sum(m.bytes for m in self.models.values()) + self.other_bytes + self.access_bytes

    @property
    def chunks(self) -> int:
        return sum(m.chunks for m in self.models.values())

    def as_dict(self) -> dict[str, Any]:
        stored = sum(m.sampled_stored_bytes for m in self.models.values())
        raw = sum(m.sampled_raw_bytes for m in self.models.values())
        chunk_objects = self.objects - self.other_objects - self.access_records
        return {
            "url": self.url,
            "chunk_tokens": self.chunk_tokens,
            "objects": self.objects,
            "bytes": self.bytes,
            "chunks": self.chunks,
            "objects_per_chunk": chunk_objects / self.chunks if self.chunks else None,
            "compression_ratio": raw / stored if stored else None,
            "chunk_size_histogram": {f"<{1 << b}": n for b, n in sorted(self.chunk_size_histogram.items())},
            "other_objects": self.other_objects,
            "other_bytes": self.other_bytes,
            "access_records": self.access_records,
            "access_bytes": self.access_bytes,
            "models": [m.as_dict() for m in sorted(self.models.values(), key=lambda m: m.label)],
            "namespaces": [n.as_dict() for _, n in sorted(self.namespaces.items())],
            "elapsed_seconds": round(self.elapsed, 3),
        }


def _stats_for(m: ModelInfo) -> ModelStats:
    return ModelStats(m.label, m.model_id.hex(), m.status, m.retired_at, m.retired_by)


async def scan_usage(
    backend: ObjectStore, *, sample: int = 256, progress: GCProgress | None = None, concurrency: int = 16
) -> UsageReport:
    """List the store once and sum objects, bytes and chunks (data objects) per model version.

    A chunk's size is its data object's. ``sample`` chunk headers per model give
    the compression ratio and tokens per chunk.
    """
    started = time.monotonic()
    try:
        chunk_tokens = (await read_root_record(backend)).chunk_tokens
        models = list((await read_registry(backend)).models)
    except StoreConfigError:  # no store here: a root that only holds namespaces still has a footprint
        async for _ in backend.list(NAMESPACES_DIR + "/"):
            break
        else:
            raise
        chunk_tokens, models = 0, []
    infos = {m.model_id.hex(): m for m in models}
    report = UsageReport(backend.url, chunk_tokens)
    for m in models:
        report.models[m.model_id.hex()] = _stats_for(m)
    limit = asyncio.Semaphore(concurrency)

    async def sample_chunk(stats: ModelStats, info: ModelInfo, key: str, size: int) -> None:
        try:
            head = await read_head(backend, key, info.spec.num_layers, size)
        except (ObjectNotFoundError, IntegrityError, FormatVersionError):
            return
        finally:
            limit.release()
        tokens = head.header.num_tokens
        stats.sampled_chunks += 1
        stats.sampled_tokens += tokens
        stats.sampled_stored_bytes += sum(span.nbytes - CRC_BYTES for span in head.spans)  # encoded layers
        stats.sampled_raw_bytes += tokens * info.spec.row_bytes * 2 * len(head.spans)

    if progress is not None:
        progress.start("list", None)
    async with task_group() as tg:
        async for meta in backend.list(""):
            if progress is not None:
                progress.advance("list", 1)
            if meta.key.startswith(NAMESPACES_DIR + "/"):
                _count_namespace(report, meta)
                continue
            if meta.key.startswith(ACCESS_DIR + "/"):
                report.access_records += 1
                report.access_bytes += meta.size
                used = parse_access_key(meta.key)
                if used is not None and used[0] in report.models:
                    model = report.models[used[0]]
                    model.last_use = _later(model.last_use, used[1])
                continue
            parsed = parse_chunk_object(meta.key)
            mid = parsed.model if parsed is not None else chunk_model_id(meta.key)
            if not mid:
                report.other_objects += 1
                report.other_bytes += meta.size
                continue
            stats = report.models.get(mid)
            if stats is None:
                stats = report.models[mid] = ModelStats(mid, mid, "unknown")
            stats.objects += 1
            stats.bytes += meta.size
            if meta.mtime is not None:
                stats.last_write = max(stats.last_write or -math.inf, meta.mtime)
            if parsed is not None and parsed.kind == "data":
                report.chunk_size_histogram[max(meta.size - 1, 0).bit_length()] += 1
                stats.last_use = _later(stats.last_use, meta.mtime)
                stats.chunks += 1
                info = infos.get(mid)
                if info is not None and stats.chunks <= sample:
                    await limit.acquire()
                    tg.create_task(sample_chunk(stats, info, meta.key, meta.size))
    if progress is not None:
        progress.finish("list")
    report.elapsed = time.monotonic() - started
    return report


def _count_namespace(report: UsageReport, meta: ObjectMeta) -> None:
    """Sum ``namespaces/<name>/...`` into that namespace's row (nested namespaces count in their top one)."""
    name, _, rest = meta.key[len(NAMESPACES_DIR) + 1 :].partition("/")
    ns = report.namespaces.get(name)
    if ns is None:
        ns = report.namespaces[name] = NamespaceStats(name)
    ns.objects += 1
    ns.bytes += meta.size
    parsed = parse_chunk_object(rest)
    if parsed is not None and parsed.kind == "data":
        ns.chunks += 1
        ns.last_use = _later(ns.last_use, meta.mtime)
    elif rest.startswith(ACCESS_DIR + "/"):
        used = parse_access_key(rest)
        ns.last_use = _later(ns.last_use, None if used is None else used[1])
