"""Bulk listing and deletion for store maintenance: aioboto3 on S3, the ObjectStore elsewhere.

Listings of a whole bucket fan out: ``plan_partitions`` walks the first levels of
``chunks/`` with one-level (delimiter) listings and splits what lies below into
partitions that can be listed at the same time: one per model, and for a big
model one per key prefix ``chunks/<mid>/<n>/c/0/0/0/0/0/<k0>/`` of its big arrays
and per ``chunks/<mid>/tails/<aa>/``. Every object is in exactly one partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvstore._tasks import run_all, task_group
from kvstore.errors import KVStoreError
from kvstore.formats.layout import SHARD_GRID, TAILS_DIR, ZARR_JSON, parse_chunk_object
from kvstore.storage import LocalObjectStore, ObjectMeta, ObjectStore
from kvstore.storage.base import translate_errors
from kvstore.storage.s3_batch import MAX_DELETE_BATCH, DeleteFailure

__all__ = [
    "BulkOps",
    "DeleteFailure",
    "LocalBulkOps",
    "SPLIT_MIN",
    "Partition",
    "StoreBulkOps",
    "list_fanned_out",
    "list_partition",
    "open_bulk_ops",
    "plan_partitions",
]


SPLIT_MIN = 256
"""A prefix is split into its sub-prefixes when a sampled sub-prefix holds at least this many objects.

Each partition costs at least one request: below about a quarter of a page per
sub-prefix (an array of ~64k chunks), listing it in one stream of full pages is
cheaper than 256 small listings, however parallel.
"""

MODEL_SPLIT_FACTOR = 16
"""A model's arrays and tail markers are sampled only from ``MODEL_SPLIT_FACTOR * split_min`` objects on:
a small model is listed whole, without requests per array of it."""

_SHARD_CHAIN = tuple(SHARD_GRID.strip("/").split("/"))
"""The levels between an array's prefix and its key fan-out ``<k0>/``: ``c/0/0/0/0/0/``."""


class BulkOps(Protocol):
    """A stream of objects under a prefix, and deletion that reports each key it could not delete.

    ``fan_out`` is how many partitions of a listing may be listed at once; a
    backend that cannot list one level of the key tree declares 1 (and is then
    listed in one stream), the others answer ``list_level``. ``split_min`` is
    the ``SPLIT_MIN`` of ``plan_partitions`` for this backend.
    """

    fan_out: int
    split_min: int

    def list_objects(self, prefix: str) -> AsyncIterator[ObjectMeta]: ...

    async def list_level(self, prefix: str) -> tuple[list[str], list[ObjectMeta]]:
        """(sub-prefixes ending in '/', objects directly under ``prefix``), as a delimiter listing gives them."""
        ...

    async def delete_objects(self, keys: Sequence[str]) -> list[DeleteFailure]: ...


@dataclass(frozen=True, slots=True)
class Partition:
    """A unit of a fan-out listing: every object under ``prefix`` (``deep``) or only those directly in it."""

    prefix: str
    deep: bool = True

    @property
    def name(self) -> str:
        """Unique in a plan (a checkpoint records finished partitions by it): a shallow one's ends in ``*``."""
        return self.prefix if self.deep else f"{self.prefix}*"


async def plan_partitions(bulk: BulkOps, prefix: str, *, done: Collection[str] = ()) -> list[Partition]:
    """Split the listing of a store's ``chunks/`` (``prefix``) into partitions, sorted by prefix.

    One partition per small model ``chunks/<mid>/``. A model of ``MODEL_SPLIT_FACTOR * bulk.split_min``
    objects or more is looked into: each of its arrays ``<n>/`` that is big (one of its first, middle and
    last key prefixes ``c/0/0/0/0/0/<k0>/`` holds ``bulk.split_min`` objects or more; always when
    ``split_min`` is 0) becomes one partition per key prefix, its ``tails/`` likewise one per ``<aa>/``,
    and every other sub-prefix one partition. A prefix is also split when ``done`` (the names of the
    partitions a resumed run has finished) holds partitions under it, so a resumed run plans them again.
    Objects directly in a level walked (``zarr.json``, keys that do not follow the layout) form shallow
    partitions, and sub-prefixes off the layout deep ones, so the partitions cover exactly what one listing
    of ``prefix`` returns. Every object under ``chunks/`` is classified alone: any partitioning will do.
    """
    if bulk.fan_out <= 1:
        return [Partition(prefix)]
    planner = _Planner(bulk, done)
    await planner.level_of_models(prefix)
    return sorted(planner.out, key=lambda p: (p.prefix, p.deep))


class _Planner:
    """The walk of ``plan_partitions``: level listings ``bulk.fan_out`` at a time, partitions into ``out``."""

    def __init__(self, bulk: BulkOps, done: Collection[str]) -> None:
        self.bulk, self.done = bulk, frozenset(done)
        self.limit = asyncio.Semaphore(bulk.fan_out)
        self.out: list[Partition] = []

    async def level(self, p: str) -> tuple[list[str], list[ObjectMeta]]:
        async with self.limit:
            return await self.bulk.list_level(p)

    async def holds(self, p: str, n: int) -> bool:
        """Whether ``p`` holds ``n`` objects or more (listing no further than that)."""
        if n <= 0:
            return True
        async with self.limit:
            count = 0
            async for _ in self.bulk.list_objects(p):
                count += 1
                if count >= n:
                    return True
        return False

    def forced(self, p: str) -> bool:
        """A finished partition lies under ``p``: split it as the interrupted run did."""
        return any(d.startswith(p) and d != p for d in self.done)

    def add(self, p: str, objects: list[ObjectMeta]) -> None:
        """A shallow partition for the objects directly in ``p``, if any."""
        if objects:
            self.out.append(Partition(p, deep=False))

    async def level_of_models(self, prefix: str) -> None:
        subs, objects = await self.level(prefix)
        self.add(prefix, objects)
        await run_all(self.model(m) for m in subs)

    async def model(self, m: str) -> None:
        big = m not in self.done and (self.forced(m) or await self.holds(m, MODEL_SPLIT_FACTOR * self.bulk.split_min))
        if not big:
            self.out.append(Partition(m))
            return
        subs, objects = await self.level(m)
        self.add(m, objects)
        await run_all(self.model_part(s, s[len(m) : -1]) for s in subs)

    async def model_part(self, p: str, name: str) -> None:
        if name == TAILS_DIR:
            await self.split(p, ())
        elif parse_chunk_object(f"{p}{ZARR_JSON}") is not None:  # an array: chunks/<mid>/<n>/
            await self.split(p, _SHARD_CHAIN)
        else:
            self.out.append(Partition(p))

    async def split(self, p: str, chain: tuple[str, ...]) -> None:
        """``p`` whole, or (when big) one partition per sub-prefix of ``p`` + ``chain``, plus what lies beside."""
        if p in self.done:
            self.out.append(Partition(p))
            return
        fan = p + "".join(f"{c}/" for c in chain)
        subs, objects = await self.level(fan)
        if not self.forced(p) and not await self.sampled_big(subs):
            self.out.append(Partition(p))
            return
        q = p
        for c in chain:
            q_subs, q_objects = await self.level(q)
            self.add(q, q_objects)
            self.out.extend(Partition(s) for s in q_subs if s != f"{q}{c}/")
            q = f"{q}{c}/"
        self.add(fan, objects)
        self.out.extend(Partition(s) for s in subs)

    async def sampled_big(self, subs: list[str]) -> bool:
        if self.bulk.split_min <= 0:
            return True
        # Up to three samples: on a local directory a deleted chunk leaves empty directories behind.
        samples = dict.fromkeys([subs[0], subs[len(subs) // 2], subs[-1]] if subs else [])
        return any(await run_all(self.holds(s, self.bulk.split_min) for s in samples))


async def list_partition(bulk: BulkOps, part: Partition) -> AsyncIterator[ObjectMeta]:
    """The objects of one partition."""
    if part.deep:
        async for meta in bulk.list_objects(part.prefix):
            yield meta
        return
    for meta in (await bulk.list_level(part.prefix))[1]:
        yield meta


async def list_fanned_out(bulk: BulkOps, prefix: str) -> list[list[ObjectMeta]]:
    """Every partition's objects under ``prefix``, in plan order, ``bulk.fan_out`` partitions listed at a time.

    Holds the whole listing: for tools and tests (the GC streams each partition).
    """
    plan = await plan_partitions(bulk, prefix)
    limit = asyncio.Semaphore(bulk.fan_out)

    async def one(part: Partition) -> list[ObjectMeta]:
        async with limit:
            return [meta async for meta in list_partition(bulk, part)]

    return await run_all(one(p) for p in plan)


class StoreBulkOps:
    """Any ObjectStore: its own listing (one stream), and deletes in batches of up to 1000, a few in flight."""

    fan_out = 1
    split_min = SPLIT_MIN

    def __init__(self, backend: ObjectStore, *, max_in_flight: int = 4) -> None:
        self._backend = backend
        self._limit = asyncio.Semaphore(max_in_flight)

    def list_objects(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        return self._backend.list(prefix)

    async def list_level(self, prefix: str) -> tuple[list[str], list[ObjectMeta]]:
        """Derived from a full listing (this backend has no delimiter listing): for small stores only."""
        subs: set[str] = set()
        objects: list[ObjectMeta] = []
        async for meta in self._backend.list(prefix):
            head, sep, _ = meta.key[len(prefix) :].partition("/")
            if sep:
                subs.add(prefix + head + "/")
            else:
                objects.append(meta)
        return sorted(subs), objects

    async def delete_objects(self, keys: Sequence[str]) -> list[DeleteFailure]:
        failures: list[DeleteFailure] = []

        async def one(batch: Sequence[str]) -> None:
            async with self._limit:
                try:
                    await self._backend.delete(batch)
                except KVStoreError as exc:  # the boundary reports per call: every key of the batch failed
                    failures.extend(DeleteFailure(k, str(exc)) for k in batch)

        async with task_group() as tg:
            for i in range(0, len(keys), MAX_DELETE_BATCH):
                tg.create_task(one(keys[i : i + MAX_DELETE_BATCH]))
        return failures


class LocalBulkOps(StoreBulkOps):
    """A local directory: the tree is walked in worker threads, thousands of entries per hop to the loop.

    (The ObjectStore's own listing hops once per directory, and directories
    outnumber data objects in sparse key prefixes: that made listing the GC's
    bottleneck on local stores.)
    """

    def __init__(
        self, backend: LocalObjectStore, *, max_in_flight: int = 4, fan_out: int = 4, split_min: int = SPLIT_MIN
    ) -> None:
        super().__init__(backend, max_in_flight=max_in_flight)
        self._root = str(backend.root)
        self._url = backend.url
        self.fan_out = fan_out
        self.split_min = split_min

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        start = os.path.join(self._root, prefix.rstrip("/")) if prefix else self._root
        walker = _walk(start, len(self._root) + 1)
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(walker, 4096))):
            for meta in batch:
                yield meta

    async def list_level(self, prefix: str) -> tuple[list[str], list[ObjectMeta]]:
        start = os.path.join(self._root, prefix.rstrip("/")) if prefix else self._root
        with translate_errors(self._url, prefix, "list"):
            return await asyncio.to_thread(_level, start, prefix)


def _level(directory: str, prefix: str) -> tuple[list[str], list[ObjectMeta]]:
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    subs: list[str] = []
    objects: list[ObjectMeta] = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                subs.append(f"{prefix}{entry.name}/")
                continue
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        objects.append(ObjectMeta(prefix + entry.name, st.st_size, st.st_mtime))
    return sorted(subs), sorted(objects, key=lambda m: m.key)


def _walk(start: str, cut: int) -> Iterator[ObjectMeta]:
    """Files under ``start`` (temporary files included: they are garbage to collect), depth first."""
    pending = [start]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):  # removed while we walk
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            key = entry.path[cut:].replace(os.sep, "/") if os.sep != "/" else entry.path[cut:]
            yield ObjectMeta(key, st.st_size, st.st_mtime)


@contextlib.asynccontextmanager
async def open_bulk_ops(
    backend: ObjectStore,
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    max_in_flight: int = 8,
    fan_out: int | None = None,
    split_min: int = SPLIT_MIN,
) -> AsyncIterator[BulkOps]:
    """aioboto3 bulk operations for ``s3://`` URLs, the backend's own calls for everything else.

    ``fan_out`` bounds the partitions listed at once (default 16 on S3, 4 on a
    local directory; 1 lists in one stream); ``split_min``: see ``plan_partitions``.
    """
    if url.startswith(("s3://", "s3a://")):
        from kvstore.storage.s3_batch import S3BatchClient

        async with S3BatchClient(
            url, storage_options, max_in_flight=max_in_flight, fan_out=fan_out or 16, split_min=split_min
        ) as client:
            yield client
    elif isinstance(backend, LocalObjectStore):
        yield LocalBulkOps(backend, max_in_flight=min(max_in_flight, 4), fan_out=fan_out or 4, split_min=split_min)
    else:
        yield StoreBulkOps(backend, max_in_flight=min(max_in_flight, 4))
