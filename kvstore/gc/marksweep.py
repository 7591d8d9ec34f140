"""Mark and sweep: find every chunk reachable from a live model version, delete old objects that are not.

Roots are the live model versions (a model record and no retirement record).
A chunk is reachable when its model is live, its data object is present with
a valid index and header, and its parent is the model's chain root or a reachable chunk. A tail
marker ``<P>/tails/<n>`` is kept while a reachable chunk with parent P has n
tokens. Everything else under ``chunks/`` is garbage, and garbage is deleted
only when its modification time is older than ``grace`` before the run began.

Two listings: the first reads the data objects' headers of live models (the mark),
the second decides and deletes object by object (the sweep). The mark set is
held as sorted arrays of 64-bit digest prefixes; a prefix collision can only
keep garbage, never drop a reachable chunk. The safety argument is in
docs/FORMAT.md ("Garbage collection").
"""

from __future__ import annotations

import asyncio
import itertools
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore._tasks import task_group
from kvstore.errors import (
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    ObjectNotFoundError,
)
from kvstore.formats.keys import key_root
from kvstore.formats.layout import CHUNKS_DIR, DATA_NAME, parse_tail_marker, zarr_array_metadata
from kvstore.gc.access_log import collect_access, read_access_log
from kvstore.gc.bulk import BulkOps, open_bulk_ops
from kvstore.gc.evict_phase import EvictColumns, EvictModel, EvictSettings, check_eviction, run_eviction
from kvstore.gc.report import GCProgress, GCReport, ModelUsage
from kvstore.reading import read_head
from kvstore.registry import Registry, read_registry, read_root_record
from kvstore.spec import ModelSpec
from kvstore.storage import ObjectMeta, ObjectStore, open_object_store
from kvstore.storage.s3_batch import MAX_DELETE_BATCH, DeleteFailure
from kvstore.store import LIVE_CHECK_TTL

__all__ = ["DEFAULT_GRACE", "MIN_GRACE", "check_grace", "mark_and_sweep", "run_gc"]

DEFAULT_GRACE = 3600.0
"""Seconds an unreachable object must have existed before the GC deletes it."""

MIN_GRACE = LIVE_CHECK_TTL
"""The grace must exceed this: a writer trusts a live check of its model version this long.

A save that found its model live up to ``MIN_GRACE`` seconds ago may still be
writing under it after the model was retired; a shorter grace lets a GC delete
those fresh objects (docs/FORMAT.md, "Garbage collection").
"""

_MAX_FAILURE_SAMPLES = 100
_TAIL_MIX = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1
_TMP_MARK = ".tmp-"


def _prefix64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


def _tail_sig(parent64: int, num_tokens: int) -> int:
    return (parent64 ^ (num_tokens * _TAIL_MIX)) & _U64


def split_chunk_key(key: str) -> tuple[str, str, str] | None:
    """(model id hex, chunk key hex, rest) of ``chunks/<mid>/<aa>/<bb>/<key>/<rest>``, else None."""
    parts = key.split("/", 5)
    if len(parts) != 6 or parts[0] != CHUNKS_DIR:
        return None
    _, mid, a, b, k, rest = parts
    if len(mid) != 32 or len(k) != 64 or k[0:2] != a or k[2:4] != b or not rest:
        return None
    return mid, k, rest


def _meta_size(spec: ModelSpec, num_tokens: int, codec: str) -> int:
    """Bytes of the zarr.json a writer of this chunk puts beside its data object."""
    try:
        return len(zarr_array_metadata(spec, num_tokens, codec))
    except (InvalidInputError, FormatVersionError):  # a codec this version does not know
        return 0


def _contains(sorted_arr: np.ndarray, value: int) -> bool:
    i = int(sorted_arr.searchsorted(np.uint64(value)))
    return i < len(sorted_arr) and int(sorted_arr[i]) == value


@dataclass(slots=True)
class _Commits:
    """Valid chunk headers of one live model, as parallel compact arrays."""

    keys: array[int] = field(default_factory=lambda: array("Q"))
    parents: array[int] = field(default_factory=lambda: array("Q"))
    index: array[int] = field(default_factory=lambda: array("Q"))
    tokens: array[int] = field(default_factory=lambda: array("I"))
    evict: EvictColumns | None = None
    """Full keys, sizes and mtimes, kept only when the run evicts."""


@dataclass(slots=True)
class _Marks:
    reachable: np.ndarray
    unreachable: np.ndarray
    tails: np.ndarray


def _reach(c: _Commits, root64: int) -> np.ndarray:
    """Boolean mask over ``c``: chunk i is reachable from ``root64`` through chunks of lower index."""
    keys = np.frombuffer(c.keys, np.uint64)
    parents = np.frombuffer(c.parents, np.uint64)
    index = np.frombuffer(c.index, np.uint64)
    order = np.argsort(index, kind="stable")
    k, p, ix = keys[order], parents[order], index[order]
    mask = np.zeros(len(k), bool)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ix)) + 1, [len(k)])) if len(k) else np.zeros(1, np.int64)
    prev = np.array([root64], np.uint64)
    for level, (a, b) in enumerate(itertools.pairwise(starts)):
        if int(ix[a]) != level or prev.size == 0:  # a missing level breaks every longer chain
            break
        hit = np.isin(p[a:b], prev)
        mask[a:b] = hit
        prev = k[a:b][hit]
    out = np.zeros(len(k), bool)
    out[order] = mask
    return out


def _marks(commits: dict[str, _Commits], roots: dict[str, int], chunk_tokens: int) -> _Marks:
    reach_parts, broken_parts, tail_parts = [], [], []
    for mid, c in commits.items():
        mask = _reach(c, roots[mid])
        keys = np.frombuffer(c.keys, np.uint64)
        reach_parts.append(keys[mask])
        broken_parts.append(keys[~mask])
        tokens = np.frombuffer(c.tokens, np.uint32)
        tails = mask & (tokens < chunk_tokens)
        parents = np.frombuffer(c.parents, np.uint64)[tails]
        mix = (tokens[tails].astype(np.uint64) * np.uint64(_TAIL_MIX)) & np.uint64(_U64)
        tail_parts.append(parents ^ mix)

    def sorted_concat(parts: list[np.ndarray]) -> np.ndarray:
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    return _Marks(sorted_concat(reach_parts), sorted_concat(broken_parts), sorted_concat(tail_parts))


class _NullProgress:
    def start(self, phase: str, total: int | None) -> None:
        pass

    def advance(self, phase: str, n: int) -> None:
        pass

    def finish(self, phase: str) -> None:
        pass


async def run_gc(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    progress: GCProgress | None = None,
    concurrency: int = 32,
    allow_short_grace: bool = False,
    max_bytes: int | None = None,
    max_idle: float | None = None,
) -> GCReport:
    """Open the store at ``url`` and run one mark-and-sweep; see ``mark_and_sweep``.

    On ``s3://`` the listing and deletion go through aioboto3 (ListObjectsV2,
    DeleteObjects batches); elsewhere through the store's own calls.
    """
    check_grace(grace, allow_short_grace)
    backend = await open_object_store(url, storage_options)
    try:
        async with open_bulk_ops(backend, str(url), storage_options) as bulk:
            return await mark_and_sweep(
                backend,
                bulk,
                grace=grace,
                dry_run=dry_run,
                progress=progress,
                concurrency=concurrency,
                allow_short_grace=allow_short_grace,
                max_bytes=max_bytes,
                max_idle=max_idle,
            )
    finally:
        await backend.close()


async def mark_and_sweep(
    backend: ObjectStore,
    bulk: BulkOps,
    *,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    progress: GCProgress | None = None,
    concurrency: int = 32,
    now: float | None = None,
    allow_short_grace: bool = False,
    max_bytes: int | None = None,
    max_idle: float | None = None,
) -> GCReport:
    """Mark chunks reachable from live model versions, then delete unreachable objects older than ``grace``.

    Uses only list, head, get (root and model records, ranged reads of data-object headers) and delete. Safe
    to interrupt at any point: every deletion targets garbage, and running again
    finishes the job. Deletions that fail are counted and sampled in the report.
    A ``grace`` of ``MIN_GRACE`` or less is refused unless ``allow_short_grace``.

    Eviction: with ``max_bytes`` the run then deletes the least recently used
    reachable chunks (leaves of chains first) until the bytes under ``chunks/``
    are at most ``max_bytes``; with ``max_idle`` (seconds) every chunk not used,
    itself or through a chunk that extends it, for that long. Nothing used
    within the grace is evicted. Every run also merges and compacts the access
    records (docs/FORMAT.md, "Access records and eviction").
    """
    check_grace(grace, allow_short_grace)
    check_eviction(max_bytes, max_idle)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInputError(f"concurrency must be a positive int, got {concurrency!r}")
    started = time.monotonic()
    t0 = time.time() if now is None else now
    report = GCReport(url=backend.url, dry_run=dry_run, grace=float(grace), cutoff=t0 - grace)
    report.max_bytes, report.max_idle = max_bytes, None if max_idle is None else float(max_idle)
    evicting = max_bytes is not None or max_idle is not None
    prog: GCProgress = progress or _NullProgress()
    root = await read_root_record(backend)
    registry = await read_registry(backend)
    _seed_models(report, registry)
    live = {m.model_id.hex(): m for m in registry.models if not m.retired}
    roots = {mid: _prefix64(key_root(m.spec, root.chunk_tokens)) for mid, m in live.items()}
    retired = {m.model_id.hex() for m in registry.models if m.retired}
    protected = {mid.hex(): why for mid, why in registry.unreadable.items()}

    log = await read_access_log(
        backend, bulk, live=set(live), protected=set(protected), cutoff=report.cutoff, concurrency=concurrency
    )
    specs = {mid: m.spec for mid, m in live.items()}
    commits = await _mark_listing(backend, bulk, specs, protected, report, prog, concurrency, track=evicting)
    kept_commits = {m: c for m, c in commits.items() if m not in protected}
    marks = _marks(kept_commits, roots, root.chunk_tokens)
    report.chunks_reachable = len(marks.reachable)
    report.protected_models = dict(protected)

    sweep = _Sweep(backend, bulk, report, prog, marks, set(live) - set(protected), retired, protected, dry_run)
    await sweep.run()
    reach = {mid: _reach(c, roots[mid]) for mid, c in kept_commits.items()}
    evicted: dict[str, np.ndarray] = {}
    if evicting:
        settings = EvictSettings(
            max_bytes, None if max_idle is None else t0 - max_idle, report.cutoff, dry_run, concurrency
        )
        models = [_evict_model(mid, c, reach[mid]) for mid, c in kept_commits.items()]
        for c in kept_commits.values():
            c.evict = None  # copied into the models (reachable rows only): free the columns before planning
        evicted = await run_eviction(backend, bulk, report, prog, models, log, settings)
        for m in models:
            if len(m.mtimes):
                report.note_use(m.mid, float(m.mtimes.max()))
    present = {mid: np.unique(np.frombuffer(c.keys, np.uint64)[reach[mid]]) for mid, c in kept_commits.items()}
    await collect_access(backend, bulk, report, log, present, evicted, dry_run)
    report.elapsed = time.monotonic() - started
    return report


def _evict_model(mid: str, c: _Commits, mask: np.ndarray) -> EvictModel:
    assert c.evict is not None
    e = c.evict
    return EvictModel(
        mid,
        np.frombuffer(c.keys, np.uint64)[mask],
        np.frombuffer(c.parents, np.uint64)[mask],
        np.frombuffer(c.index, np.uint64)[mask].astype(np.int64),
        np.frombuffer(e.digests, np.uint8).reshape(-1, 32)[mask],
        np.frombuffer(e.sizes, np.uint64)[mask].astype(np.int64),
        np.frombuffer(e.mtimes, np.float64)[mask],
    )


def check_grace(grace: float, allow_short_grace: bool, *, override: str = "allow_short_grace=True") -> None:
    """Refuse a grace that is not a number of seconds, or not above ``MIN_GRACE`` unless allowed.

    ``override`` names the switch that accepts a short grace, for the message
    (the CLI's is ``--allow-short-grace``).
    """
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise InvalidInputError(f"grace must be a non-negative number of seconds, got {grace!r}")
    if grace <= MIN_GRACE and allow_short_grace is not True:
        raise InvalidInputError(
            f"grace must exceed the {MIN_GRACE:g} s retirement-check interval, got {grace:g} s: a writer that "
            f"checked its model version live up to {MIN_GRACE:g} s ago may still be saving under it, and a "
            f"shorter grace could delete what it writes; pass {override} to accept that risk"
        )


def _seed_models(report: GCReport, registry: Registry) -> None:
    for m in registry.models:
        report.by_model[m.model_id.hex()] = ModelUsage(m.label, m.model_id.hex(), m.status)
    for mid in registry.unreadable:
        report.by_model[mid.hex()] = ModelUsage(mid.hex(), mid.hex(), "unreadable")


async def _mark_listing(
    backend: ObjectStore,
    bulk: BulkOps,
    live: dict[str, ModelSpec],
    protected: dict[str, str],
    report: GCReport,
    prog: GCProgress,
    concurrency: int,
    *,
    track: bool = False,
) -> dict[str, _Commits]:
    """First listing: read (concurrently, bounded) the header of every data object of a live model.

    ``live`` maps each live model id (hex) to its spec. With ``track`` (eviction) each
    header's full key, chunk bytes (data object + zarr.json) and data mtime are kept too.
    """
    commits: dict[str, _Commits] = {}
    limit = asyncio.Semaphore(concurrency)

    async def read(mid: str, khex: str, key: str, size: int, mtime: float | None) -> None:
        try:
            try:
                rec = (await read_head(backend, key, live[mid].num_layers, size)).header
            except ObjectNotFoundError:  # deleted since it was listed: not committed
                return
            except IntegrityError:
                return
            except FormatVersionError as exc:  # a newer writer: leave its model's objects alone
                protected.setdefault(mid, f"chunk header in another format version: {exc}")
                return
            if rec.key.hex() != khex or rec.model_id.hex() != mid:
                return
            c = commits.setdefault(mid, _Commits(evict=EvictColumns() if track else None))
            c.keys.append(_prefix64(rec.key))
            c.parents.append(_prefix64(rec.parent))
            c.index.append(rec.index)
            c.tokens.append(rec.num_tokens)
            if c.evict is not None:  # zarr.json is derived from the spec, tokens and codec: its size too
                c.evict.add(rec.key, size + _meta_size(live[mid], rec.num_tokens, rec.codec), mtime)
            report.commits_read += 1
            prog.advance("read", 1)
        finally:
            limit.release()

    prog.start("list", None)
    prog.start("read", None)
    async with task_group() as tg:
        batch = 0
        async for meta in bulk.list_objects(CHUNKS_DIR + "/"):
            report.objects_listed += 1
            batch += 1
            if batch == 1000:
                prog.advance("list", batch)
                batch = 0
            if not meta.key.endswith(DATA_NAME):
                continue
            parts = split_chunk_key(meta.key)
            if parts is None or parts[2] != DATA_NAME or parts[0] not in live:
                continue
            await limit.acquire()  # back-pressure: the listing waits while `concurrency` reads are pending
            tg.create_task(read(parts[0], parts[1], meta.key, meta.size, meta.mtime))
        prog.advance("list", batch)
    prog.finish("list")
    prog.finish("read")
    return commits


class _Sweep:
    """Second listing: classify each object, delete old garbage in batches while listing goes on."""

    def __init__(
        self,
        backend: ObjectStore,
        bulk: BulkOps,
        report: GCReport,
        prog: GCProgress,
        marks: _Marks,
        live: set[str],
        retired: set[str],
        protected: dict[str, str],
        dry_run: bool,
    ) -> None:
        self.backend, self.bulk, self.report, self.prog, self.marks = backend, bulk, report, prog, marks
        self.live, self.retired, self.protected, self.dry_run = live, retired, protected, dry_run
        self._last_chunk: tuple[str, str] | None = None
        self._last_reason: str | None = None
        self._rechecked: dict[tuple[str, str], bool] = {}
        self._pending: list[tuple[str, str, int]] = []
        self._limit = asyncio.Semaphore(4)

    def _usage(self, mid: str) -> ModelUsage:
        usage = self.report.by_model.get(mid)
        if usage is None:
            status = "retired" if mid in self.retired else ("unknown" if mid else "-")
            usage = self.report.by_model[mid] = ModelUsage(mid or "(malformed)", mid, status)
        return usage

    def classify(self, key: str) -> tuple[str, str | None, tuple[str, str] | None]:
        """(model id hex, garbage reason or None to keep, chunk id) of one object."""
        parts = split_chunk_key(key)
        if parts is None:
            return "", "malformed", None
        mid, khex, rest = parts
        if mid in self.protected:
            return mid, None, None
        if mid not in self.live:
            return mid, ("retired" if mid in self.retired else "unknown-model"), None
        if _TMP_MARK in rest:
            return mid, "temp", None
        try:
            k64 = int(khex[:16], 16)
        except ValueError:
            return mid, "malformed", None
        if rest.startswith("tails/"):
            n = parse_tail_marker(rest)
            keep = n is not None and rest.count("/") == 1 and _contains(self.marks.tails, _tail_sig(k64, n))
            return mid, (None if keep else "stale-tail"), None
        chunk = (mid, khex)
        if chunk != self._last_chunk:
            self._last_chunk = chunk
            if _contains(self.marks.reachable, k64):
                self._last_reason = None
            else:
                self._last_reason = "unreachable" if _contains(self.marks.unreachable, k64) else "uncommitted"
        return mid, self._last_reason, chunk

    async def _still_old(self, chunk: tuple[str, str]) -> bool:
        """Re-check a committed-but-unreachable chunk just before deleting: a writer may have refreshed it."""
        cached = self._rechecked.get(chunk)
        if cached is None:
            mid, khex = chunk
            path = f"{CHUNKS_DIR}/{mid}/{khex[0:2]}/{khex[2:4]}/{khex}/{DATA_NAME}"
            meta = await self.backend.head(path)
            cached = meta is None or meta.mtime is None or meta.mtime < self.report.cutoff
            if len(self._rechecked) > 100_000:
                self._rechecked.clear()
            self._rechecked[chunk] = cached
        return cached

    async def run(self) -> None:
        self.prog.start("sweep", self.report.objects_listed or None)
        async with task_group() as tg:
            n = 0
            async for meta in self.bulk.list_objects(CHUNKS_DIR + "/"):
                await self._one(meta, tg)
                n += 1
                if n == 1000:
                    self.prog.advance("sweep", n)
                    n = 0
            self._flush(tg)
            self.prog.advance("sweep", n)
        self.prog.finish("sweep")

    async def _one(self, meta: ObjectMeta, tg: asyncio.TaskGroup) -> None:
        mid, reason, chunk = self.classify(meta.key)
        usage = self._usage(mid)
        if reason is None:
            usage.kept_objects += 1
            usage.kept_bytes += meta.size
            return
        old = meta.mtime is not None and meta.mtime < self.report.cutoff
        if old and reason == "unreachable" and chunk is not None:
            old = await self._still_old(chunk)
        if not old:
            usage.young_objects += 1
            usage.young_bytes += meta.size
            return
        self.report.reasons[reason] += 1
        if self.dry_run:
            usage.freed_objects += 1
            usage.freed_bytes += meta.size
            return
        self._pending.append((meta.key, mid, meta.size))
        if len(self._pending) >= MAX_DELETE_BATCH:
            await self._limit.acquire()  # back-pressure on the listing
            self._flush(tg, acquired=True)

    def _flush(self, tg: asyncio.TaskGroup, *, acquired: bool = False) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            if acquired:
                self._limit.release()
            return
        tg.create_task(self._delete(batch, acquired))

    async def _delete(self, batch: list[tuple[str, str, int]], acquired: bool) -> None:
        try:
            failures = await self.bulk.delete_objects([key for key, _, _ in batch])
        finally:
            if acquired:
                self._limit.release()
        failed = {f.key for f in failures}
        for key, mid, size in batch:
            if key in failed:
                continue
            usage = self._usage(mid)
            usage.freed_objects += 1
            usage.freed_bytes += size
        self._record_failures(failures)

    def _record_failures(self, failures: list[DeleteFailure]) -> None:
        report = self.report
        report.failures_total += len(failures)
        room = _MAX_FAILURE_SAMPLES - len(report.failures)
        report.failures.extend(failures[: max(room, 0)])
