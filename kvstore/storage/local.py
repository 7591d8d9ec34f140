"""A local directory as an object store, with atomic publication of every object.

Writes go to a temporary file in the target directory and are published with
``rename`` (or ``link`` for create-only), so a reader or a crash never sees a
torn object. Reads and writes of bytes run on kvstore's worker threads
(``kvstore._workers``); metadata calls on ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from kvstore._workers import in_worker
from kvstore.errors import ObjectNotFoundError
from kvstore.storage.base import ObjectMeta, ObjectStore, ReadPlan, translate_errors

__all__ = ["TMP_MARK", "LocalObjectStore"]

TMP_MARK = ".tmp-"
"""In the name of a file being written (published by rename, or garbage of a crashed writer)."""
# A directory, or a path below a file, is no object: the key is missing, as on an object store.
_NO_OBJECT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_IOV_MAX = 1024  # Linux's limit on buffers per preadv/writev


class LocalObjectStore(ObjectStore):
    """Objects are files under ``root``; keys map to relative paths."""

    reads_into_buffers = True
    batches_heads = True
    writes_parts = True

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = f"file://{self.root}"
        self.fsync = fsync

    def _path(self, key: str) -> Path:
        return self.root / key

    async def get(self, key: str) -> bytes:
        with translate_errors(self.url, key, "get"):
            try:
                return await in_worker(self._path(key).read_bytes)
            except _NO_OBJECT as exc:
                raise ObjectNotFoundError(f"{self.url}: no object at {key!r}") from exc

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        with translate_errors(self.url, key, "get_range"):
            try:
                return await in_worker(self._pread, self._path(key), start, end)
            except _NO_OBJECT as exc:
                raise ObjectNotFoundError(f"{self.url}: no object at {key!r}") from exc

    @staticmethod
    def _pread(path: Path, start: int, end: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(str(path))
            return os.pread(fd, max(0, end - start), start)
        finally:
            os.close(fd)

    async def get_range_into(
        self, key: str, start: int, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        with translate_errors(self.url, key, "get_range_into"):
            try:
                return await in_worker(self._preadv_then, self._path(key), start, buffers, then)
            except _NO_OBJECT as exc:
                raise ObjectNotFoundError(f"{self.url}: no object at {key!r}") from exc

    async def get_planned(
        self,
        key: str,
        head: int,
        plan: ReadPlan,
        *,
        then: Callable[[int], None] | None = None,
    ) -> tuple[bytes, int]:
        with translate_errors(self.url, key, "get_planned"):
            try:
                return await in_worker(self._planned, self._path(key), head, plan, then)
            except _NO_OBJECT as exc:
                raise ObjectNotFoundError(f"{self.url}: no object at {key!r}") from exc

    @classmethod
    def _planned(
        cls,
        path: Path,
        head: int,
        plan: ReadPlan,
        then: Callable[[int], None] | None,
    ) -> tuple[bytes, int]:
        """``get_planned`` in one worker-thread call: ``pread`` of the head, then one ``preadv``."""
        first = cls._pread(path, 0, head)
        start, buffers = plan(first)
        return first, cls._preadv_then(path, start, buffers, then)

    @classmethod
    def _preadv_then(
        cls, path: Path, start: int, buffers: Sequence[memoryview], then: Callable[[int], None] | None
    ) -> int:
        filled = cls._preadv(path, start, buffers)
        if then is not None:
            then(filled)
        return filled

    @staticmethod
    def _preadv(path: Path, start: int, buffers: Sequence[memoryview]) -> int:
        """One ``preadv`` scattering the bytes at ``start`` into ``buffers`` (resumed if the kernel stops short)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(str(path))
            pending = [memoryview(b).cast("B") for b in buffers if len(b)]
            filled = 0
            while pending:
                done = os.preadv(fd, pending[:_IOV_MAX], start + filled)
                if done == 0:  # end of file
                    break
                filled += done
                while pending and done >= len(pending[0]):
                    done -= len(pending[0])
                    pending.pop(0)
                if pending and done:
                    pending[0] = pending[0][done:]
            return filled
        finally:
            os.close(fd)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        with translate_errors(self.url, key, "put"):
            return await in_worker(self._write, self._path(key), parts, create_only)

    @staticmethod
    def _open_tmp(path: Path) -> tuple[Path, int]:
        """Create a temporary file beside ``path`` (and its directory on first use): its path and a writable fd."""
        tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return tmp, os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            return tmp, os.open(tmp, flags, 0o644)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        with translate_errors(self.url, key, "put"):
            return await in_worker(self._write, self._path(key), [memoryview(data)], create_only)

    def _write(self, path: Path, parts: Sequence[memoryview], create_only: bool) -> bool:
        """``writev`` into a temporary file, then publish it: ``rename``, or ``link`` for create-only."""
        if create_only and path.exists():
            return False
        tmp, fd = self._open_tmp(path)
        published = False
        try:
            try:
                _write_all(fd, parts)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not create_only:
                os.replace(tmp, path)
                published = True
                return True
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            if not published:
                tmp.unlink(missing_ok=True)

    async def head(self, key: str) -> ObjectMeta | None:
        with translate_errors(self.url, key, "head"):
            try:
                st = await asyncio.to_thread(os.stat, self._path(key))
            except _NO_OBJECT:
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            return ObjectMeta(key, st.st_size, st.st_mtime)

    async def head_many(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        """Every ``stat`` in one worker-thread call: a lookup of a long prompt costs one thread hop."""
        with translate_errors(self.url, keys[0] if keys else "", "head"):
            return await asyncio.to_thread(self._stat_all, keys)

    def _stat_all(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        out: list[ObjectMeta | None] = []
        for key in keys:
            try:
                st = os.stat(self._path(key))
            except _NO_OBJECT:
                out.append(None)
                continue
            out.append(ObjectMeta(key, st.st_size, st.st_mtime) if stat.S_ISREG(st.st_mode) else None)
        return out

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        start = self._path(prefix.rstrip("/")) if prefix else self.root
        pending = [start]
        while pending:
            directory = pending.pop()
            with translate_errors(self.url, str(directory), "list"):
                try:
                    entries = await asyncio.to_thread(_scan, directory)
                except (FileNotFoundError, NotADirectoryError):
                    continue
            for path, is_dir, size, mtime in entries:
                if is_dir:
                    pending.append(path)
                else:  # temporary files of crashed writers are listed too: they are garbage to collect
                    yield ObjectMeta(path.relative_to(self.root).as_posix(), size, mtime)

    async def delete(self, keys: Sequence[str]) -> None:
        with translate_errors(self.url, keys[0] if keys else "", "delete"):
            await asyncio.to_thread(self._unlink_all, keys)

    def _unlink_all(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


def _scan(directory: Path) -> list[tuple[Path, bool, int, float]]:
    out = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                out.append((Path(entry.path), True, 0, 0.0))
            else:
                st = entry.stat(follow_symlinks=False)
                out.append((Path(entry.path), False, st.st_size, st.st_mtime))
    return out


def _write_all(fd: int, parts: Sequence[memoryview]) -> None:
    """``writev`` every byte of ``parts`` (a short write resumes where it stopped)."""
    pending = [memoryview(p).cast("B") for p in parts if len(p)]
    while pending:
        done = os.writev(fd, pending[:_IOV_MAX])
        while pending and done >= len(pending[0]):
            done -= len(pending[0])
            pending.pop(0)
        if pending and done:
            pending[0] = pending[0][done:]
