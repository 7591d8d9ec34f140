"""The eviction phase of a GC run: after the sweep, delete the least recently used reachable chunks.

Plans with ``kvstore.gc.evict`` (pure arrays) and deletes along the order in
windows. Just before deleting, it re-lists ``access/`` for records written
since the run began (uses since then protect a chunk and its ancestors through
the grace), and HEADs each chunk's data object as the sweep does: a chunk
refreshed within the grace is kept, and so is every ancestor of a kept chunk.
Evicting a chunk deletes its data object, its only object (its array's
``zarr.json`` is shared); its tail marker becomes stale-tail garbage for the next
run. A load that races the deletion finds the data object gone after its HEAD
round: a shorter hit, never wrong data.
"""

from __future__ import annotations

import asyncio
from array import array
from dataclasses import dataclass, field

import numpy as np

from kvstore.errors import InvalidInputError
from kvstore.formats.layout import data_path
from kvstore.gc.access_log import AccessLog, merge_uses, read_access_log
from kvstore.gc.bulk import BulkOps
from kvstore.gc.evict import EvictionCandidates, eviction_order, last_use
from kvstore.gc.report import GCProgress, GCReport
from kvstore.storage import ObjectMeta, ObjectStore
from kvstore.storage.s3_batch import DeleteFailure

__all__ = ["EvictColumns", "EvictModel", "EvictSettings", "check_eviction", "run_eviction"]

_WINDOW = 1024
_DELETE_SLICE = 256  # a window's deletions go in slices side by side (several worker threads on a local directory)


@dataclass(slots=True)
class EvictColumns:
    """What eviction needs beyond the mark, per valid header: full key, data object bytes and mtime."""

    digests: bytearray = field(default_factory=bytearray)
    sizes: array[int] = field(default_factory=lambda: array("Q"))
    mtimes: array[float] = field(default_factory=lambda: array("d"))

    def add(self, digest: bytes, size: int, mtime: float | None) -> None:
        self.digests += digest
        self.sizes.append(size)
        self.mtimes.append(0.0 if mtime is None else mtime)

    def extend(self, other: EvictColumns) -> None:
        """Append ``other``'s rows after these."""
        self.digests += other.digests
        self.sizes.extend(other.sizes)
        self.mtimes.extend(other.mtimes)


@dataclass(slots=True)
class EvictModel:
    """One live model's reachable chunks (rows of the mark, filtered by reachability)."""

    mid: str
    keys: np.ndarray
    parents: np.ndarray
    index: np.ndarray
    tokens: np.ndarray
    digests: np.ndarray  # (n, 32) uint8
    sizes: np.ndarray
    mtimes: np.ndarray


@dataclass(frozen=True, slots=True)
class EvictSettings:
    max_bytes: int | None
    idle_before: float | None
    cutoff: float
    dry_run: bool
    concurrency: int


def check_eviction(max_bytes: int | None, max_idle: float | None) -> None:
    """Refuse a byte budget that is not an int >= 0, or an idle time that is not a number of seconds >= 0."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise InvalidInputError(f"max_bytes must be an int >= 0 or None, got {max_bytes!r}")
    if max_idle is not None and (
        isinstance(max_idle, bool) or not isinstance(max_idle, (int, float)) or not 0 <= max_idle < float("inf")
    ):
        raise InvalidInputError(f"max_idle must be a number of seconds >= 0 or None, got {max_idle!r}")


def _path(m: EvictModel, row: int) -> str:
    """The data object of row ``row`` of ``m``."""
    return data_path(bytes.fromhex(m.mid), m.digests[row].tobytes(), int(m.tokens[row]))


async def run_eviction(
    backend: ObjectStore,
    bulk: BulkOps,
    report: GCReport,
    prog: GCProgress,
    models: list[EvictModel],
    log: AccessLog,
    settings: EvictSettings,
) -> dict[str, np.ndarray]:
    """Evict along the order; return the sorted key prefixes of the chunks evicted, per model."""
    fresh = await read_access_log(
        backend, bulk, live={m.mid for m in models}, protected=set(), cutoff=-1.0, skip=log.listed
    )
    for mid, (k, t) in fresh.uses.items():  # uses since the run began count (they protect through the grace)
        old = log.uses.get(mid)
        log.uses[mid] = merge_uses([old[0], k], [old[1], t]) if old is not None else (k, t)
        log.read.setdefault(mid, []).extend(fresh.read.get(mid, []))
    log.listed |= fresh.listed
    lasts = []
    for m in models:
        ak, at = log.uses.get(m.mid, (np.zeros(0, np.uint64), np.zeros(0, np.uint32)))
        lasts.append(last_use(m.keys, m.mtimes, ak, at))
    cands = eviction_order(
        [m.keys for m in models], [m.parents for m in models], [m.index for m in models],
        [m.sizes for m in models], lasts,
    )  # fmt: skip
    report.bytes_before_eviction = total = report.kept_bytes
    evicted = await _Evictor(backend, bulk, report, prog, models, cands, settings).run(total)
    return {models[i].mid: np.sort(np.asarray(keys, np.uint64)) for i, keys in evicted.items()}


class _Evictor:
    def __init__(
        self,
        backend: ObjectStore,
        bulk: BulkOps,
        report: GCReport,
        prog: GCProgress,
        models: list[EvictModel],
        cands: EvictionCandidates,
        settings: EvictSettings,
    ) -> None:
        self.backend, self.bulk, self.report, self.prog = backend, bulk, report, prog
        self.models, self.cands, self.s = models, cands, settings
        self.blocked: set[tuple[int, int]] = set()  # (model, key prefix) of chunks a kept chunk depends on
        self.limit = asyncio.Semaphore(settings.concurrency)

    def _wanted(self, pos: int, freed: int, total: int) -> bool:
        s, rec = self.s, float(self.cands.recency[self.cands.order[pos]])
        if rec >= s.cutoff:
            return False
        over = s.max_bytes is not None and total - freed > s.max_bytes
        return over or (s.idle_before is not None and rec < s.idle_before)

    async def run(self, total: int) -> dict[int, list[int]]:
        cands, order = self.cands, self.cands.order
        evicted: dict[int, list[int]] = {}
        freed = pos = 0
        self.prog.start("evict", None)
        while pos < len(order) and self._wanted(pos, freed, total):
            window: list[int] = []
            planned = freed
            while pos < len(order) and len(window) < _WINDOW and self._wanted(pos, planned, total):
                window.append(int(order[pos]))
                planned += int(cands.sizes[order[pos]])
                pos += 1
            fresh = await self._still_old(window)
            chosen = []
            for j, old in zip(window, fresh, strict=True):
                m, key = int(cands.model[j]), int(cands.keys[j])
                if not old or (m, key) in self.blocked:  # used since, or a kept chunk depends on it
                    self.blocked.add((m, int(cands.parents[j])))
                    continue
                chosen.append(j)
            gone, kept = await self._delete(chosen)
            freed += gone
            for j in chosen:
                if j in kept:  # its deletion failed: the chunk stays, and so must its ancestors
                    self.blocked.add((int(cands.model[j]), int(cands.parents[j])))
                else:
                    evicted.setdefault(int(cands.model[j]), []).append(int(cands.keys[j]))
            self.prog.advance("evict", len(chosen))
        self.prog.finish("evict")
        s, report = self.s, self.report
        report.bytes_after = total - freed
        if s.max_bytes is not None and total - freed > s.max_bytes:
            report.budget_met = False
            report.budget_note = (
                f"{total - freed:,} bytes remain, over the {s.max_bytes:,}-byte budget: every remaining chunk was "
                f"used (or is needed by one used) within the {report.grace:g} s grace"
            )
        elif s.max_bytes is not None:
            report.budget_met = True
        return evicted

    async def _still_old(self, window: list[int]) -> list[bool]:
        """HEAD the data objects again just before deleting: a writer may have refreshed one (or it is gone).

        One call for the window where the backend batches HEADs (a local directory), else
        ``concurrency`` at a time.
        """
        paths = [self._path(j) for j in window]
        if self.backend.batches_heads:
            metas = await self.backend.head_many(paths)
        else:

            async def head(path: str) -> ObjectMeta | None:
                async with self.limit:
                    return await self.backend.head(path)

            metas = list(await asyncio.gather(*(head(p) for p in paths)))
        cutoff = self.s.cutoff
        return [m is not None and (m.mtime is None or m.mtime < cutoff) for m in metas]

    def _path(self, j: int) -> str:
        """The data object of candidate ``j``."""
        return _path(self.models[int(self.cands.model[j])], int(self.cands.row[j]))

    async def _delete_all(self, keys: list[str]) -> list[DeleteFailure]:
        slices = [keys[i : i + _DELETE_SLICE] for i in range(0, len(keys), _DELETE_SLICE)]
        results = await asyncio.gather(*(self.bulk.delete_objects(part) for part in slices))
        return [f for failures in results for f in failures]

    async def _delete(self, chosen: list[int]) -> tuple[int, set[int]]:
        """Delete the chosen chunks' data objects; returns the bytes freed (or to free, in a dry run) and the
        chunks whose data object could not be deleted."""
        cands, report = self.cands, self.report
        paths = [self._path(j) for j in chosen]
        failed: set[str] = set()
        if not self.s.dry_run and chosen:
            failures = await self._delete_all(paths)
            failed = {f.key for f in failures}
            report.failures_total += len(failures)
            report.failures.extend(failures[: max(0, 100 - len(report.failures))])
        freed, kept = 0, set()
        for j, path in zip(chosen, paths, strict=True):
            if path in failed:
                kept.add(j)
                continue
            size = int(cands.sizes[j])
            usage = report.by_model[self.models[int(cands.model[j])].mid]
            usage.evicted_chunks += 1
            usage.evicted_bytes += size
            usage.kept_objects -= 1
            usage.kept_bytes -= size
            usage.freed_objects += 1
            usage.freed_bytes += size
            report.reasons["evicted"] += 1
            freed += size
        return freed, kept
