"""The local-disk cache tier: one directory per source store, a byte budget, least recently used out first.

A cache directory may be shared by several stores (and processes): each source
store gets the subdirectory named by a digest of its identity (URL and
endpoint), so two sources never see each other's objects. Recency is a file's
mtime: a hit touches it, and opening the tier scans the directory once (in a
worker thread) to rebuild the index, so eviction order survives restarts.

Everything here is best effort: a failing or full cache disk is a miss, never
a failed read. Files are published by rename (``LocalObjectStore``), so a
reader never sees a torn copy; checksums above the tiers catch any other damage.

The file operations on one key (write, read, unlink) run one after another in
the order they were issued, each with its change to the index, as tasks that a
cancelled caller does not stop: an eviction's unlink that worker threads run late
cannot delete a copy written after it, and the index stays what is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvstore._workers import in_worker
from kvstore.errors import InvalidInputError, KVStoreError
from kvstore.storage.base import translate_errors
from kvstore.storage.local import TMP_MARK, LocalObjectStore

__all__ = ["DEFAULT_DISK_CACHE_BYTES", "DiskTier", "cache_dir", "source_identity"]

logger = logging.getLogger("kvstore")

T = TypeVar("T")

DEFAULT_DISK_CACHE_BYTES = 10 << 30
"""10 GiB: a fair share of one NVMe drive, far more than one prompt's KV."""

_STALE_TMP_SECONDS = 3600.0
"""Temporary files older than this belong to a crashed writer (a live write takes milliseconds)."""

_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def cache_dir(cache_url: str | os.PathLike[str]) -> Path:
    """The directory of a ``cache_url`` (a path or ``file://``): the disk tier is local by definition."""
    text = os.fspath(cache_url)
    if "://" in text and not text.startswith("file://"):
        raise InvalidInputError(f"cache_url must be a local directory, got {text!r}")
    return Path(text.removeprefix("file://")).expanduser().absolute()


def source_identity(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """What tells one source store from another: its URL and, for S3-like stores, the endpoint.

    ``s3://bucket/kv`` on two endpoints (AWS and a MinIO) are different stores.
    """
    options = storage_options or {}
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if endpoint is None and url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return json.dumps([url, endpoint])


class DiskTier:
    """Objects of one source store as files under ``root``, within ``budget`` bytes."""

    def __init__(self, root: Path, budget: int) -> None:
        self.root = root
        self.budget = budget
        self.used = 0
        """Bytes of the copies in the index (what this process knows is on disk)."""
        self.evictions = 0
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, least recently used first
        self._files = LocalObjectStore(root)
        self._last_op: dict[str, asyncio.Task[Any]] = {}  # per key: its latest file operation, until it ends

    @classmethod
    async def open(cls, directory: Path, source_id: str, budget: int) -> DiskTier:
        """The tier for ``source_id`` in the cache ``directory``, its index rebuilt from disk."""
        digest = hashlib.sha256(source_id.encode()).hexdigest()[:32]
        tier = cls(directory / digest, budget)
        with translate_errors(f"file://{tier.root}", ""):  # an unreadable cache directory is a setup error
            await asyncio.to_thread(tier._rebuild)
        return tier

    def _rebuild(self) -> None:
        """Index every copy by mtime (oldest first), clear crashed writers' files, and evict down to the budget."""
        found: list[tuple[int, str, int]] = []
        stale = time.time() - _STALE_TMP_SECONDS
        for path, st in _walk(self.root):
            if TMP_MARK in path.name:
                if st.st_mtime < stale:
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                continue
            found.append((st.st_mtime_ns, path.relative_to(self.root).as_posix(), st.st_size))
        found.sort()
        self._index = OrderedDict((key, size) for _, key, size in found)
        self.used = sum(size for _, _, size in found)
        self._unlink(self._over_budget())

    async def get(self, key: str) -> bytes | None:
        """The cached copy, or None; a hit makes ``key`` the most recently used (in memory and on disk)."""
        return await self._hit(key, _read_and_touch)

    async def _hit(self, key: str, read: Callable[..., tuple[bytes, int]], *args: int) -> bytes | None:
        """Run ``read(path, *args) -> (bytes, file size)`` in a thread; a miss or a failing disk gives None."""

        async def op() -> bytes | None:
            try:
                data, size = await in_worker(read, self.root / key, *args)
            except _MISSING:
                self._forget(key)
                return None
            except OSError as exc:  # a failing cache disk is a miss: the source still has the object
                logger.warning("disk cache %s: cannot read %r: %s", self.root, key, exc)
                self._forget(key)
                return None
            self._note(key, size)  # a copy another process wrote is adopted here
            return data

        data: bytes | None = await self._in_order([key], op)
        if data is not None:
            await self._evict()
        return data

    async def get_range(self, key: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the cached copy (fewer if it is shorter), or None; recency as in ``get``."""
        return await self._hit(key, _pread_and_touch, start, end)

    async def put(self, key: str, parts: Sequence[memoryview]) -> None:
        """Keep a copy of ``key`` (best effort), then evict the least recently used copies over the budget."""
        size = sum(len(p) for p in parts)
        if size > self.budget:
            return

        async def op() -> bool:
            try:
                await self._files.put_parts(key, parts)
            except KVStoreError as exc:
                logger.warning("disk cache %s: cannot write %r: %s", self.root, key, exc)
                return False
            self._note(key, size)
            return True

        if await self._in_order([key], op):
            await self._evict()

    async def drop(self, keys: Sequence[str]) -> None:
        """Remove the copies of ``keys``; the next ``get`` of each is a miss."""
        for key in keys:
            self._forget(key)
        await self._unlink_in_order(keys, prune=False)

    async def _evict(self) -> None:
        if victims := self._over_budget():  # no thread hop while within the budget
            await self._unlink_in_order(victims, prune=True)

    async def _unlink_in_order(self, keys: Sequence[str], *, prune: bool) -> None:
        """Unlink after every earlier operation on ``keys``; a copy of one noted meanwhile is forgotten with it."""

        async def op() -> None:
            await asyncio.to_thread(self._unlink, keys, prune)
            for key in keys:
                self._forget(key)

        await self._in_order(keys, op)

    async def _in_order(self, keys: Sequence[str], op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` as a task after the operations issued before it on any of ``keys``; a cancelled caller
        leaves it running, so the next operation on those keys still comes after it."""
        before = {t for key in keys if (t := self._last_op.get(key)) is not None}

        async def ordered() -> T:
            if before:
                await asyncio.wait(before)
            return await op()

        task = asyncio.ensure_future(ordered())
        for key in keys:
            self._last_op[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            for key in keys:
                if self._last_op.get(key) is t:
                    del self._last_op[key]

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def _note(self, key: str, size: int) -> None:
        old = self._index.pop(key, None)
        self.used += size - (old or 0)
        self._index[key] = size

    def _forget(self, key: str) -> None:
        self.used -= self._index.pop(key, 0)

    def _over_budget(self) -> list[str]:
        """Take the least recently used keys out of the index until the rest fit; the caller unlinks them."""
        victims = []
        while self.used > self.budget and self._index:
            key, size = self._index.popitem(last=False)
            self.used -= size
            self.evictions += 1
            victims.append(key)
        return victims

    def _unlink(self, keys: Sequence[str], prune: bool = True) -> None:
        """Delete files of ``keys``; failures leave a file the next scan adopts (and evicts if it must)."""
        for key in keys:
            path = self.root / key
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
                if prune:  # an evicted chunk leaves no empty directory behind (fails while others remain)
                    path.parent.rmdir()


def _read_and_touch(path: Path) -> tuple[bytes, int]:
    data = path.read_bytes()
    _touch(path)
    return data, len(data)


def _pread_and_touch(path: Path, start: int, end: int) -> tuple[bytes, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(str(path))
        data = os.pread(fd, max(0, end - start), start)
    finally:
        os.close(fd)
    _touch(path)
    return data, st.st_size


def _touch(path: Path) -> None:
    """Recency for the next process's scan (replaced, evicted or read-only meanwhile: the bytes read still count)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _walk(root: Path) -> list[tuple[Path, os.stat_result]]:
    """Every regular file below ``root`` with its stat (nothing when ``root`` does not exist yet)."""
    out = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        out.append((Path(entry.path), entry.stat(follow_symlinks=False)))
        except FileNotFoundError:
            continue
    return out
