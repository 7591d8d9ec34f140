"""A local directory as an object store, with atomic publication of every object.

Writes go to a temporary file in the target directory and are published with
``rename`` (or ``link`` for create-only), so a reader or a crash never sees a
torn object. Blocking file I/O runs in worker threads.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from kvstore.storage.base import ObjectMeta, ObjectStore, translate_errors

__all__ = ["LocalObjectStore"]

_TMP_MARK = ".tmp-"


class LocalObjectStore(ObjectStore):
    """Objects are files under ``root``; keys map to relative paths."""

    reads_into_buffers = True

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = f"file://{self.root}"
        self.fsync = fsync

    def _path(self, key: str) -> Path:
        return self.root / key

    async def get(self, key: str) -> bytes:
        with translate_errors(self.url, key):
            return await asyncio.to_thread(self._path(key).read_bytes)

    async def get_into(self, key: str, buffers: Sequence[memoryview]) -> int:
        with translate_errors(self.url, key):
            return await asyncio.to_thread(self._read_into, self._path(key), buffers)

    @staticmethod
    def _read_into(path: Path, buffers: Sequence[memoryview]) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == sum(len(b) for b in buffers):
                done = os.preadv(fd, list(buffers), 0)
                if done != size:  # short read: the file shrank under us
                    return done
            return size
        finally:
            os.close(fd)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        with translate_errors(self.url, key):
            return await asyncio.to_thread(self._write, self._path(key), data, create_only)

    def _write(self, path: Path, data: bytes, create_only: bool) -> bool:
        if create_only and path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            if create_only:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    async def head(self, key: str) -> ObjectMeta | None:
        with translate_errors(self.url, key):
            try:
                st = await asyncio.to_thread(os.stat, self._path(key))
            except FileNotFoundError:
                return None
            return ObjectMeta(key, st.st_size, st.st_mtime)

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        start = self._path(prefix.rstrip("/")) if prefix else self.root
        pending = [start]
        while pending:
            directory = pending.pop()
            with translate_errors(self.url, str(directory)):
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
        with translate_errors(self.url, keys[0] if keys else ""):
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
