"""Mark and sweep: find every chunk reachable from a live model version, delete old objects that are not.

Roots are the live model versions (a model record and no retirement record).
A chunk is reachable when its model is live, its data object is present with a
valid index and a header that matches the object's path (model, token count, key
coordinates) and names the store's codec, and its parent is the model's chain
root or a reachable chunk. A tail marker ``tails/<p[0:2]>/<p[2:4]>/<p>/<n>`` is
kept while a reachable chunk with parent p has n tokens; an array's ``zarr.json``
while its model is live. Nothing of a model whose record or chunk headers are
of another format version is touched. Everything else under ``chunks/`` is garbage, and
garbage is deleted only when its modification time is older than ``grace``
before the run began.

Two listings: the first reads the data objects' headers of live models (the mark),
the second decides and deletes object by object, each on its own (the sweep).
Each fans out over the partitions of ``chunks/`` (per model, and per key prefix
of a big model's arrays: ``kvstore.gc.bulk.plan_partitions``), a bounded number
at a time, so a bucket of millions of chunks lists in parallel. The mark is held
as compact arrays (about 60 bytes per chunk, sorted 64-bit signatures of key
coordinates and token count for the sweep's lookups); a collision can only keep
garbage, never drop a reachable chunk. A run can record finished partitions in a
checkpoint file and resume from it (kvstore/gc/checkpoint.py). The safety
argument is in docs/FORMAT.md ("Garbage collection").
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from array import array
from collections.abc import Awaitable, Callable
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
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import key_root
from kvstore.formats.layout import CHUNKS_DIR, ChunkObject, chunk_model_id, key_coords, parse_chunk_object
from kvstore.gc.access_log import collect_access, read_access_log
from kvstore.gc.bulk import BulkOps, Partition, list_partition, open_bulk_ops, plan_partitions
from kvstore.gc.checkpoint import Checkpoint, MarkedPartition, encode_mark
from kvstore.gc.evict_phase import EvictColumns, EvictModel, EvictSettings, check_eviction, run_eviction
from kvstore.gc.report import GCProgress, GCReport, ModelUsage
from kvstore.gc.tally import Tally
from kvstore.reading import read_head
from kvstore.registry import Registry, read_registry, read_root_record
from kvstore.spec import ModelSpec
from kvstore.storage import ObjectMeta, ObjectStore, open_object_store
from kvstore.storage.local import TMP_MARK
from kvstore.storage.s3_batch import MAX_DELETE_BATCH
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

_TAIL_MIX = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def _prefix64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


def _fold(coords: tuple[int, ...]) -> int:
    """64 bits of a data object's key coordinates (``key_coords``): all its path tells of the chunk's key."""
    h = 0
    for c in coords:
        h = ((h ^ c) * _TAIL_MIX) & _U64
    return h


def _sig(bits64: int, num_tokens: int) -> int:
    """What the mark records of a data object (``_fold`` of its coordinates) or of a tail marker (its parent's
    key prefix), with the token count."""
    return (bits64 ^ (num_tokens * _TAIL_MIX)) & _U64


def _contains(sorted_arr: np.ndarray, value: int) -> bool:
    i = int(sorted_arr.searchsorted(np.uint64(value)))
    return i < len(sorted_arr) and int(sorted_arr[i]) == value


_COLUMNS = ("keys", "parents", "index", "tokens", "coords", "sizes", "mtimes")


@dataclass(slots=True)
class _Commits:
    """Valid chunk headers of one live model, as parallel compact arrays."""

    keys: array[int] = field(default_factory=lambda: array("Q"))
    parents: array[int] = field(default_factory=lambda: array("Q"))
    index: array[int] = field(default_factory=lambda: array("Q"))
    tokens: array[int] = field(default_factory=lambda: array("I"))
    coords: array[int] = field(default_factory=lambda: array("Q"))
    """``_fold`` of the data object's key coordinates: what the sweep finds of the chunk in its path."""
    sizes: array[int] = field(default_factory=lambda: array("Q"))
    mtimes: array[float] = field(default_factory=lambda: array("d"))
    evict: EvictColumns | None = None
    """Full keys, data object bytes and mtimes, kept only when the run evicts (never in a checkpoint: a run
    that evicts does not take one)."""

    def columns(self) -> dict[str, array[Any]]:
        """The per-chunk arrays by name (what a checkpoint records of the mark)."""
        return {name: getattr(self, name) for name in _COLUMNS}


@dataclass(slots=True)
class _Marks:
    """Sorted ``_sig`` arrays: of reachable chunks, of unreachable ones, of the tail markers to keep."""

    reachable: np.ndarray
    unreachable: np.ndarray
    tails: np.ndarray


_REACH_BLOCK = 1 << 20
"""Chunks of one chain level looked up at once: bounds _reach's temporaries (about 25 bytes per chunk)."""


def _reach(c: _Commits, root64: int) -> np.ndarray:
    """Boolean mask over ``c``: chunk i is reachable from ``root64`` through chunks of lower index.

    Level by level (chain index 0, 1, ...) in an index order computed once; the
    only per-chunk temporary besides the mask is that order (8 bytes per chunk).
    """
    keys = np.frombuffer(c.keys, np.uint64)
    parents = np.frombuffer(c.parents, np.uint64)
    index = np.frombuffer(c.index, np.uint64)
    mask = np.zeros(len(keys), bool)
    if not len(keys):
        return mask
    order = np.argsort(index)
    prev = np.array([root64], np.uint64)
    level = 0
    while prev.size:
        a = int(np.searchsorted(index, np.uint64(level), side="left", sorter=order))
        b = int(np.searchsorted(index, np.uint64(level), side="right", sorter=order))
        if a == b:  # a missing level breaks every longer chain
            break
        found: list[np.ndarray] = []
        for s in range(a, b, _REACH_BLOCK):
            idx = order[s : min(b, s + _REACH_BLOCK)]
            p = parents[idx]
            pos = np.searchsorted(prev, p)
            hit = prev[np.minimum(pos, len(prev) - 1)] == p
            mask[idx[hit]] = True
            found.append(keys[idx[hit]])
        prev = np.concatenate(found)
        prev.sort()
        level += 1
    return mask


def _marks(commits: dict[str, _Commits], roots: dict[str, int], chunk_tokens: int) -> _Marks:
    """The sorted mark arrays (8 bytes per chunk in all); sorted in place, duplicates harmless to lookups."""
    masks = {mid: _reach(c, roots[mid]) for mid, c in commits.items()}
    n_reach = sum(int(np.count_nonzero(m)) for m in masks.values())
    n_all = sum(len(m) for m in masks.values())
    reachable = np.empty(n_reach, np.uint64)
    unreachable = np.empty(n_all - n_reach, np.uint64)
    tail_parts = []
    r = u = 0
    for mid, mask in masks.items():
        c = commits[mid]
        tokens = np.frombuffer(c.tokens, np.uint32)
        mix = tokens.astype(np.uint64) * np.uint64(_TAIL_MIX)  # wraps modulo 2**64, as _sig does
        sigs = np.frombuffer(c.coords, np.uint64) ^ mix
        hits = int(np.count_nonzero(mask))
        np.compress(mask, sigs, out=reachable[r : r + hits])
        np.compress(~mask, sigs, out=unreachable[u : u + len(mask) - hits])
        r, u = r + hits, u + len(mask) - hits
        del sigs
        tails = mask & (tokens < chunk_tokens)
        tail_parts.append(np.frombuffer(c.parents, np.uint64)[tails] ^ mix[tails])
    del masks
    reachable.sort()
    unreachable.sort()
    tails = np.concatenate(tail_parts) if tail_parts else np.zeros(0, np.uint64)
    tails.sort()
    return _Marks(reachable, unreachable, tails)


def _distinct(sorted_arr: np.ndarray) -> int:
    return int(np.count_nonzero(sorted_arr[1:] != sorted_arr[:-1])) + 1 if len(sorted_arr) else 0


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
    checkpoint: str | os.PathLike[str] | None = None,
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
                checkpoint=checkpoint,
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
    checkpoint: str | os.PathLike[str] | None = None,
) -> GCReport:
    """Mark chunks reachable from live model versions, then delete unreachable objects older than ``grace``.

    Uses only list, head, get (root and model records, ranged reads of data-object headers) and delete. Both
    listings fan out over the store's partitions (per model, and per key prefix of a big model's arrays;
    ``kvstore.gc.bulk.plan_partitions``), ``bulk.fan_out`` at a time. Safe
    to interrupt at any point: every deletion targets garbage, and running again
    finishes the job. With ``checkpoint`` (a local file path) finished partitions are recorded there and a run
    started again with the same file resumes: same cutoff, no header read twice, counts that add up
    (``report.checkpoint`` says whether it resumed or why not); the file is removed once the run completes.
    Deletions that fail are counted and sampled in the report.
    A ``grace`` of ``MIN_GRACE`` or less is refused unless ``allow_short_grace``.

    Eviction: with ``max_bytes`` the run then deletes the least recently used
    reachable chunks (leaves of chains first) until the bytes under ``chunks/``
    are at most ``max_bytes``; with ``max_idle`` (seconds) every chunk not used,
    itself or through a chunk that extends it, for that long. Nothing used
    within the grace is evicted. Every run also merges and compacts the access
    records (docs/FORMAT.md, "Access records and eviction"). A run that evicts
    takes no checkpoint (its eviction state is not recorded): run the
    model-version sweep with one first, then evict.
    """
    check_grace(grace, allow_short_grace)
    check_eviction(max_bytes, max_idle)
    evicting = max_bytes is not None or max_idle is not None
    if evicting and checkpoint is not None:
        raise InvalidInputError("a run that evicts (max_bytes, max_idle) takes no checkpoint")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInputError(f"concurrency must be a positive int, got {concurrency!r}")
    started = time.monotonic()
    t0 = time.time() if now is None else now
    ckpt: Checkpoint | None = None
    if checkpoint is not None:
        ckpt = await asyncio.to_thread(
            Checkpoint.open, checkpoint, url=backend.url, t0=t0, grace=float(grace), dry_run=dry_run, now=t0
        )
        t0 = ckpt.t0
    report = GCReport(url=backend.url, dry_run=dry_run, grace=float(grace), cutoff=t0 - grace)
    report.checkpoint = ckpt.note if ckpt is not None else ""
    report.max_bytes, report.max_idle = max_bytes, None if max_idle is None else float(max_idle)
    prog: GCProgress = progress or _NullProgress()
    try:
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
        commits = await _Mark(
            backend, bulk, specs, root.codec, protected, report, prog, concurrency, ckpt, evicting
        ).run()
        marked = {m: c for m, c in commits.items() if m in live and m not in protected}
        marks = _marks(marked, roots, root.chunk_tokens)
        report.chunks_reachable = _distinct(marks.reachable)
        report.protected_models = dict(protected)

        live_ids = set(live) - set(protected)
        await _Sweep(backend, bulk, report, prog, marks, live_ids, retired, protected, dry_run, ckpt).run()
        del marks
        reach = {mid: _reach(c, roots[mid]) for mid, c in marked.items()}
        evicted: dict[str, np.ndarray] = {}
        if evicting:
            settings = EvictSettings(
                max_bytes, None if max_idle is None else t0 - max_idle, report.cutoff, dry_run, concurrency
            )
            models = [_evict_model(mid, c, reach[mid]) for mid, c in marked.items()]
            for c in marked.values():
                c.evict = None  # copied into the models (reachable rows only): free the columns before planning
            evicted = await run_eviction(backend, bulk, report, prog, models, log, settings)
            for m in models:
                if len(m.mtimes):
                    report.note_use(m.mid, float(m.mtimes.max()))
        present = {mid: np.unique(np.frombuffer(c.keys, np.uint64)[reach[mid]]) for mid, c in marked.items()}
        await collect_access(backend, bulk, report, log, present, evicted, dry_run)
    finally:
        if ckpt is not None:
            ckpt.close()
    if ckpt is not None:
        await asyncio.to_thread(ckpt.remove)
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
        np.frombuffer(c.tokens, np.uint32)[mask],
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


async def _each_partition(bulk: BulkOps, done: set[str], work: Callable[[Partition], Awaitable[None]]) -> None:
    """Plan the partitions of ``chunks/`` and run ``work`` on each not in ``done``, ``bulk.fan_out`` at a time."""
    plan = await plan_partitions(bulk, CHUNKS_DIR + "/", done=done)
    slots = asyncio.Semaphore(bulk.fan_out)

    async def one(part: Partition) -> None:
        try:
            await work(part)
        finally:
            slots.release()

    async with task_group() as tg:
        for part in plan:
            if part.name in done:
                continue
            await slots.acquire()
            tg.create_task(one(part))


class _Mark:
    """First listing: read (concurrently, bounded) the header of every data object of a live model.

    Partition by partition: a partition's headers join the mark (and the
    checkpoint) once all of them are read.
    """

    def __init__(
        self,
        backend: ObjectStore,
        bulk: BulkOps,
        live: dict[str, ModelSpec],
        codec: str,
        protected: dict[str, str],
        report: GCReport,
        prog: GCProgress,
        concurrency: int,
        ckpt: Checkpoint | None,
        track: bool = False,
    ) -> None:
        """``live`` maps each live model id (hex) to its spec; ``codec`` is the store's. With ``track``
        (eviction) each header's full key, data object bytes and mtime are kept too."""
        self.backend, self.bulk, self.live, self.protected = backend, bulk, live, protected
        self.codec = codec
        self.report, self.prog, self.ckpt, self.track = report, prog, ckpt, track
        self.commits: dict[str, _Commits] = {}
        self._reads = asyncio.Semaphore(concurrency)

    async def run(self) -> dict[str, _Commits]:
        done: set[str] = set()
        if self.ckpt is not None:
            for part in self.ckpt.marked:
                self._absorb(part)
                done.add(part.name)
            self.ckpt.marked.clear()
        self.prog.start("list", None)
        self.prog.start("read", None)
        await _each_partition(self.bulk, done, self._partition)
        self.prog.finish("list")
        self.prog.finish("read")
        return self.commits

    def _absorb(self, part: MarkedPartition) -> None:
        self.report.objects_listed += part.listed
        self.report.commits_read += part.read
        for mid, why in part.protected.items():
            self.protected.setdefault(mid, why)
        for mid, cols in part.columns.items():
            c = self.commits.setdefault(mid, _Commits())
            columns = c.columns()
            if cols.keys() != columns.keys() or any(code != columns[n].typecode for n, (code, _) in cols.items()):
                raise InvalidInputError(f"checkpoint partition {part.name!r} has columns {sorted(cols)}")
            for name, (_, raw) in cols.items():
                columns[name].frombytes(raw)

    async def _partition(self, part: Partition) -> None:
        found: dict[str, _Commits] = {}
        protected: dict[str, str] = {}
        listed = 0
        async with task_group() as tg:
            batch = 0
            async for meta in list_partition(self.bulk, part):
                listed += 1
                batch += 1
                if batch == 1000:
                    self.prog.advance("list", batch)
                    batch = 0
                parsed = parse_chunk_object(meta.key)
                if parsed is None or parsed.kind != "data" or parsed.model not in self.live:
                    continue
                await self._reads.acquire()  # back-pressure: the listing waits while `concurrency` reads are pending
                tg.create_task(self._read(parsed, meta, found, protected))
            self.prog.advance("list", batch)
        columns = {mid: {n: (str(a.typecode), a.tobytes()) for n, a in c.columns().items()} for mid, c in found.items()}
        read = sum(len(c.keys) for c in found.values())
        record = MarkedPartition(part.name, listed, read, protected, columns)
        frame = await asyncio.to_thread(encode_mark, record) if self.ckpt is not None else None
        # No await from here on: the partition joins the mark and the checkpoint together, or neither.
        if self.ckpt is not None and frame is not None:
            self.ckpt.add_mark(frame)
        self._absorb(record)
        for mid, c in found.items():  # the eviction columns, row for row after what _absorb appended
            if c.evict is not None:
                into = self.commits[mid]
                into.evict = into.evict or EvictColumns()
                into.evict.extend(c.evict)

    async def _read(
        self, parsed: ChunkObject, meta: ObjectMeta, found: dict[str, _Commits], protected: dict[str, str]
    ) -> None:
        mid = parsed.model
        try:
            try:
                rec = (await read_head(self.backend, meta.key, self.live[mid].num_layers, meta.size)).header
                if rec.codec != self.codec:
                    get_codec(rec.codec, stored=True)  # unknown: FormatVersionError
                    return  # another codec than the store's: damage
            except ObjectNotFoundError:  # deleted since it was listed
                return
            except IntegrityError:
                return
            except FormatVersionError as exc:  # a newer writer: leave its model's objects alone
                protected.setdefault(mid, f"chunk header in another format version: {exc}")
                return
            if rec.model_id.hex() != mid or rec.num_tokens != parsed.num_tokens or key_coords(rec.key) != parsed.coords:
                return  # not the chunk its path names: damage
            c = found.setdefault(mid, _Commits(evict=EvictColumns() if self.track else None))
            c.keys.append(_prefix64(rec.key))
            c.parents.append(_prefix64(rec.parent))
            c.index.append(rec.index)
            c.tokens.append(rec.num_tokens)
            c.coords.append(_fold(parsed.coords))
            c.sizes.append(meta.size)
            c.mtimes.append(math.nan if meta.mtime is None else meta.mtime)
            if c.evict is not None:
                c.evict.add(rec.key, meta.size, meta.mtime)
            self.prog.advance("read", 1)
        finally:
            self._reads.release()


@dataclass(slots=True)
class _PartState:
    """Sweep state of one partition: its counts, and deletions waiting for a batch."""

    tally: Tally = field(default_factory=Tally)
    pending: list[tuple[str, str, int, str]] = field(default_factory=list)


class _Sweep:
    """Second listing: classify each object, delete old garbage in batches while listing goes on.

    Partition by partition: a partition's counts join the report (and the
    checkpoint) when it is done, those of a delete batch when it is deleted.
    """

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
        ckpt: Checkpoint | None,
    ) -> None:
        self.backend, self.bulk, self.report, self.prog, self.marks = backend, bulk, report, prog, marks
        self.live, self.retired, self.protected, self.dry_run = live, retired, protected, dry_run
        self.ckpt = ckpt
        self._batches = asyncio.Semaphore(4)

    def _usage(self, mid: str) -> ModelUsage:
        usage = self.report.by_model.get(mid)
        if usage is None:
            status = "retired" if mid in self.retired else ("unknown" if mid else "-")
            usage = self.report.by_model[mid] = ModelUsage(mid or "(malformed)", mid, status)
        return usage

    def classify(self, key: str) -> tuple[str, str | None]:
        """(model id hex, garbage reason or None to keep) of one object."""
        parsed = parse_chunk_object(key)
        mid = parsed.model if parsed is not None else chunk_model_id(key)
        if not mid:
            return "", "malformed"
        if mid in self.protected:  # a newer writer's objects may not follow this layout
            return mid, None
        if mid not in self.live:
            return mid, ("retired" if mid in self.retired else "unknown-model")
        if parsed is None:
            return (mid, "temp") if TMP_MARK in key.rsplit("/", 1)[-1] else ("", "malformed")
        if parsed.kind == "metadata":
            return mid, None
        if parsed.kind == "tail":
            assert parsed.parent is not None
            keep = _contains(self.marks.tails, _sig(int(parsed.parent[:16], 16), parsed.num_tokens))
            return mid, (None if keep else "stale-tail")
        assert parsed.coords is not None
        sig = _sig(_fold(parsed.coords), parsed.num_tokens)
        if _contains(self.marks.reachable, sig):
            return mid, None
        return mid, ("unreachable" if _contains(self.marks.unreachable, sig) else "damaged")

    async def _still_old(self, key: str) -> bool:
        """Re-check an unreachable chunk's data object just before deleting it: a writer may have refreshed it."""
        meta = await self.backend.head(key)
        return meta is None or meta.mtime is None or meta.mtime < self.report.cutoff

    async def run(self) -> None:
        done: set[str] = set()
        if self.ckpt is not None:
            for name, tally in self.ckpt.swept.items():
                tally.add_to(self.report, self._usage)
                done.add(name)
            for tally in self.ckpt.freed:
                tally.add_to(self.report, self._usage)
            self.ckpt.swept.clear()
            self.ckpt.freed.clear()
        self.prog.start("sweep", self.report.objects_listed or None)
        await _each_partition(self.bulk, done, self._partition)
        self.prog.finish("sweep")

    async def _partition(self, part: Partition) -> None:
        state = _PartState()
        async with task_group() as tg:
            n = 0
            async for meta in list_partition(self.bulk, part):
                await self._one(meta, state, tg)
                n += 1
                if n == 1000:
                    self.prog.advance("sweep", n)
                    n = 0
            await self._flush(state, tg)
            self.prog.advance("sweep", n)
        # No await from here on: the partition counts once, in the report and in the checkpoint.
        state.tally.add_to(self.report, self._usage)
        if self.ckpt is not None:
            self.ckpt.add_sweep(part.name, state.tally)

    async def _one(self, meta: ObjectMeta, state: _PartState, tg: asyncio.TaskGroup) -> None:
        mid, reason = self.classify(meta.key)
        if reason is None:
            state.tally.count(mid, "kept", meta.size)
            return
        old = meta.mtime is not None and meta.mtime < self.report.cutoff
        if old and reason == "unreachable":
            old = await self._still_old(meta.key)
        if not old:
            state.tally.count(mid, "young", meta.size)
            return
        if self.dry_run:
            state.tally.reasons[reason] += 1
            state.tally.count(mid, "freed", meta.size)
            return
        state.pending.append((meta.key, mid, meta.size, reason))
        if len(state.pending) >= MAX_DELETE_BATCH:
            await self._flush(state, tg)

    async def _flush(self, state: _PartState, tg: asyncio.TaskGroup) -> None:
        batch, state.pending = state.pending, []
        if batch:
            await self._batches.acquire()  # back-pressure on the listing
            tg.create_task(self._delete(batch, state))

    async def _delete(self, batch: list[tuple[str, str, int, str]], state: _PartState) -> None:
        try:
            failures = await self.bulk.delete_objects([key for key, _, _, _ in batch])
        finally:
            self._batches.release()
        failed = {f.key for f in failures}
        freed = Tally()
        for key, mid, size, reason in batch:
            if key in failed:  # counted with its partition: a resumed run lists it again
                state.tally.reasons[reason] += 1
            else:
                freed.reasons[reason] += 1
                freed.count(mid, "freed", size)
        state.tally.failed(failures)
        freed.add_to(self.report, self._usage)
        if self.ckpt is not None:
            self.ckpt.add_freed(freed)
