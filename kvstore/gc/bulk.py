"""Bulk listing and deletion for store maintenance: aioboto3 on S3, the ObjectStore elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

from kvstore._tasks import task_group
from kvstore.errors import KVStoreError
from kvstore.storage import LocalObjectStore, ObjectMeta, ObjectStore
from kvstore.storage.s3_batch import MAX_DELETE_BATCH, DeleteFailure

__all__ = ["BulkOps", "DeleteFailure", "LocalBulkOps", "StoreBulkOps", "open_bulk_ops"]


class BulkOps(Protocol):
    """A stream of objects under a prefix, and deletion that reports each key it could not delete."""

    def list_objects(self, prefix: str) -> AsyncIterator[ObjectMeta]: ...

    async def delete_objects(self, keys: Sequence[str]) -> list[DeleteFailure]: ...


class StoreBulkOps:
    """Any ObjectStore: its own listing, and deletes in batches of up to 1000, a few in flight."""

    def __init__(self, backend: ObjectStore, *, max_in_flight: int = 4) -> None:
        self._backend = backend
        self._limit = asyncio.Semaphore(max_in_flight)

    def list_objects(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        return self._backend.list(prefix)

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
    """A local directory: the tree is walked in a worker thread, thousands of entries per hop to the loop.

    (The ObjectStore's own listing hops once per directory; a chunk has about
    seven directories, which made listing the GC's bottleneck on local stores.)
    """

    def __init__(self, backend: LocalObjectStore, *, max_in_flight: int = 4) -> None:
        super().__init__(backend, max_in_flight=max_in_flight)
        self._root = str(backend.root)

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        start = os.path.join(self._root, prefix.rstrip("/")) if prefix else self._root
        walker = _walk(start, len(self._root) + 1)
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(walker, 4096))):
            for meta in batch:
                yield meta


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
    backend: ObjectStore, url: str, storage_options: dict[str, Any] | None = None, *, max_in_flight: int = 8
) -> AsyncIterator[BulkOps]:
    """aioboto3 bulk operations for ``s3://`` URLs, the backend's own calls for everything else."""
    if url.startswith(("s3://", "s3a://")):
        from kvstore.storage.s3_batch import S3BatchClient

        async with S3BatchClient(url, storage_options, max_in_flight=max_in_flight) as client:
            yield client
    elif isinstance(backend, LocalObjectStore):
        yield LocalBulkOps(backend, max_in_flight=min(max_in_flight, 4))
    else:
        yield StoreBulkOps(backend, max_in_flight=min(max_in_flight, 4))
