"""Bulk listing and deletion for store maintenance: aioboto3 on S3, the ObjectStore elsewhere.

Listings of a whole bucket fan out: ``plan_partitions`` walks the first levels of
the key tree with one-level (delimiter) listings and splits what lies below into
partitions that can be listed at the same time (for ``chunks/``, one per model
and fan-out prefix ``chunks/<mid>/<aa>/``). Every object is in exactly one
partition, and a partition lists its objects in key order, so a chunk's objects
still arrive together.
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
fan-out prefix (a model of ~64k objects), listing the model in one stream of
full pages is cheaper than 256 small listings, however parallel.
"""


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


async def plan_partitions(bulk: BulkOps, prefix: str, *, depth: int = 2, done: Collection[str] = ()) -> list[Partition]:
    """Split the listing under ``prefix`` into partitions down to ``depth`` levels, sorted by prefix.

    Below the first level a prefix is split only when it is big (one of its
    first, middle and last sub-prefixes holds ``bulk.split_min`` objects or
    more; always when ``split_min`` is 0) or when ``done`` (the
    partitions a resumed run has finished) holds partitions under it; so for
    ``chunks/``: one partition per small model, one per fan-out prefix
    ``chunks/<mid>/<aa>/`` of a big one. Loose objects at the levels walked
    (keys that do not follow the layout) form shallow partitions of their own,
    so the partitions cover exactly what one listing of ``prefix`` returns.
    """
    if bulk.fan_out <= 1:
        return [Partition(prefix)]
    out: list[Partition] = []
    limit = asyncio.Semaphore(bulk.fan_out)

    async def level_of(p: str) -> tuple[list[str], list[ObjectMeta]]:
        async with limit:
            return await bulk.list_level(p)

    async def split(p: str) -> tuple[str, tuple[list[str], list[ObjectMeta]] | None]:
        """``p`` and its level listing when it is to be split, else None."""
        if p in done:
            return p, None
        found = await level_of(p)
        subs = found[0]
        if bulk.split_min <= 0 or any(d.startswith(p) and d != p for d in done):
            return p, found
        # Up to three samples: on a local directory a deleted chunk leaves empty directories behind.
        for sample in dict.fromkeys([subs[0], subs[len(subs) // 2], subs[-1]] if subs else []):
            async with limit:
                n = 0
                async for _ in bulk.list_objects(sample):
                    n += 1
                    if n >= bulk.split_min:
                        return p, found
        return p, None

    levels = [(prefix, await level_of(prefix))]
    for d in range(depth):
        nxt: list[str] = []
        for p, (subs, objects) in levels:
            if objects:
                out.append(Partition(p, deep=False))
            nxt.extend(subs)
        if d + 1 == depth:
            out.extend(Partition(p) for p in nxt)
            break
        decided = await run_all(split(p) for p in nxt)
        out.extend(Partition(p) for p, found in decided if found is None)
        levels = [(p, found) for p, found in decided if found is not None]
    return sorted(out, key=lambda p: p.prefix)


async def list_partition(bulk: BulkOps, part: Partition) -> AsyncIterator[ObjectMeta]:
    """The objects of one partition, in key order within each chunk."""
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

    (The ObjectStore's own listing hops once per directory; a chunk has about
    seven directories, which made listing the GC's bottleneck on local stores.)
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
