"""The GC's side of access records: read and merge them per model, compact them, collect those of dead models.

Writers only create records (``kvstore.access``); the GC reads every record
under ``access/`` (bounded concurrency), merges each live model's into sorted
arrays (chunk-key prefix -> latest use), and after the run writes one compacted
record per live model and deletes only the records it read: writers keep
adding new ones meanwhile. Records of retired or unknown models, and damaged
ones, are garbage under the same grace rule as chunks.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import numpy as np

from kvstore._tasks import task_group
from kvstore.errors import FormatVersionError, IntegrityError, ObjectNotFoundError
from kvstore.formats.access import (
    ACCESS_DIR,
    MAX_ACCESS_ENTRIES,
    AccessRecord,
    access_prefix,
    access_record_name,
    parse_access_key,
)
from kvstore.gc.bulk import BulkOps
from kvstore.gc.report import GCReport
from kvstore.storage import ObjectStore

__all__ = ["AccessLog", "collect_access", "merge_uses", "read_access_log"]

_EMPTY_KEYS = np.zeros(0, np.uint64)
_EMPTY_TIMES = np.zeros(0, np.uint32)


def merge_uses(keys: list[np.ndarray], times: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys with the latest time of each, from any number of (keys, times) parts."""
    if not keys:
        return _EMPTY_KEYS, _EMPTY_TIMES
    k, t = np.concatenate(keys), np.concatenate(times)
    order = np.lexsort((t, k))
    k, t = k[order], t[order]
    last = np.ones(len(k), bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last], t[last]


@dataclass(slots=True)
class AccessLog:
    """What one listing of ``access/`` found: merged uses of live models, records read, garbage."""

    uses: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    read: dict[str, list[str]] = field(default_factory=dict)
    """Records read and merged, per live model (hex id): the ones compaction may delete."""
    listed: set[str] = field(default_factory=set)
    garbage: list[tuple[str, int]] = field(default_factory=list)
    """(key, size) of records to delete: of retired or unknown models, damaged or misnamed, older than the cutoff."""
    young_garbage: int = 0
    records_read: int = 0
    bytes: int = 0

    def last_use(self, mid: str) -> float | None:
        uses = self.uses.get(mid)
        return float(uses[1].max()) if uses is not None and len(uses[1]) else None


async def read_access_log(
    backend: ObjectStore,
    bulk: BulkOps,
    *,
    live: set[str],
    protected: set[str],
    cutoff: float,
    concurrency: int = 32,
    skip: set[str] | None = None,
) -> AccessLog:
    """List ``access/`` and read every record of a live model (except those in ``skip``: read before)."""
    log = AccessLog()
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    limit = asyncio.Semaphore(concurrency)

    async def read(mid: str, key: str, size: int, old: bool) -> None:
        try:
            try:
                rec = AccessRecord.from_msgpack(await backend.get(key))
            except ObjectNotFoundError:  # compacted by another run meanwhile
                return
            except FormatVersionError:  # a newer writer's: leave it alone
                return
            except IntegrityError:
                if old:
                    log.garbage.append((key, size))
                return
            if rec.model_id.hex() != mid:
                if old:
                    log.garbage.append((key, size))
                return
            ks, ts = parts.setdefault(mid, ([], []))
            ks.append(rec.keys)
            ts.append(rec.times)
            log.read.setdefault(mid, []).append(key)
            log.records_read += 1
        finally:
            limit.release()

    async with task_group() as tg:
        async for meta in bulk.list_objects(ACCESS_DIR + "/"):
            log.listed.add(meta.key)
            log.bytes += meta.size
            if skip is not None and meta.key in skip:
                continue
            old = meta.mtime is not None and meta.mtime < cutoff
            parsed = parse_access_key(meta.key)
            mid = parsed[0] if parsed is not None else None
            if mid is not None and mid in protected:
                continue
            if mid is None or mid not in live:
                if old:
                    log.garbage.append((meta.key, meta.size))
                else:
                    log.young_garbage += 1
                continue
            await limit.acquire()
            tg.create_task(read(mid, meta.key, meta.size, old))
    for mid, (ks, ts) in parts.items():
        log.uses[mid] = merge_uses(ks, ts)
    return log


async def compact(
    backend: ObjectStore,
    bulk: BulkOps,
    log: AccessLog,
    keep: dict[str, np.ndarray],
) -> tuple[int, int, int]:
    """Per live model with records read: write its merged uses of the chunks in ``keep[mid]`` (sorted) as
    one record, then delete the records read. Returns (records written, deleted, failed deletions).

    A model whose one record already holds only kept chunks is left as it is.
    """
    writer = os.urandom(8)
    written = deleted = failed = 0
    seq = 0
    for mid, names in log.read.items():
        k, t = log.uses.get(mid, (_EMPTY_KEYS, _EMPTY_TIMES))
        kept = keep.get(mid, _EMPTY_KEYS)
        mask = np.isin(k, kept, assume_unique=True) if len(k) else np.zeros(0, bool)
        if len(names) == 1 and bool(mask.all()):
            continue
        k, t = k[mask], t[mask]
        for start in range(0, len(k), MAX_ACCESS_ENTRIES):
            rec = AccessRecord(
                bytes.fromhex(mid), writer, k[start : start + MAX_ACCESS_ENTRIES], t[start:][:MAX_ACCESS_ENTRIES]
            )
            seq += 1
            await backend.put(access_prefix(rec.model_id) + access_record_name(rec.last, writer, seq), rec.to_msgpack())
            written += 1
        failures = await bulk.delete_objects(names)
        failed += len(failures)
        deleted += len(names) - len(failures)
    return written, deleted, failed


async def collect_access(
    backend: ObjectStore,
    bulk: BulkOps,
    report: GCReport,
    log: AccessLog,
    present: dict[str, np.ndarray],
    evicted: dict[str, np.ndarray],
    dry_run: bool,
) -> None:
    """After a run: delete the old access records of dead models, then compact each live model's into one
    record of the chunks still present (``present`` minus ``evicted``, sorted key prefixes per model)."""
    report.access_records_read = log.records_read
    for mid in log.uses:
        last = log.last_use(mid)
        if last is not None:
            report.note_use(mid, last)
    report.access_records_garbage = len(log.garbage)
    if dry_run:
        return
    failures = await bulk.delete_objects([key for key, _ in log.garbage])
    report.failures_total += len(failures)
    report.access_records_deleted += len(log.garbage) - len(failures)
    for mid in report.protected_models:  # protected during the mark (a newer writer's header): leave its records
        log.read.pop(mid, None)
    keep = {}
    for mid, keys in present.items():
        gone = evicted.get(mid)
        keep[mid] = keys if gone is None else np.setdiff1d(keys, gone, assume_unique=True)
    written, deleted, failed = await compact(backend, bulk, log, keep)
    report.access_records_written += written
    report.access_records_deleted += deleted
    report.failures_total += failed
