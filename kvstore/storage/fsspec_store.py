"""Any fsspec filesystem as an object store (s3://, memory://, gcs://, ...).

Async filesystems (s3fs) are awaited directly; synchronous ones run in worker
threads. An async filesystem is bound to the event loop it was created in, so
``open_fsspec`` must be awaited inside the loop that will use the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.memory import MemoryFile

from kvstore.errors import InvalidInputError
from kvstore.storage.base import ObjectMeta, ObjectStore
from kvstore.storage.s3_settings import (
    S3FS_RETRIES,
    botocore_config_kwargs,
    client_kwargs,
    session_with_shared_loader,
    uses_https,
)
from kvstore.storage.translation import http_answer, translate_errors

__all__ = ["TRANSPORTS", "TRANSPORT_OPTION", "FsspecObjectStore", "S3ObjectStore", "open_fsspec"]

TRANSPORT_OPTION = "transport"
"""The ``storage_options`` key (kvstore's own, never passed to s3fs) that picks how S3 object bytes travel."""
TRANSPORTS = ("botocore", "crt")
"""botocore through s3fs (the default), or awscrt (``kvstore.storage.s3_crt``, the ``crt`` extra)."""


def _mtime(info: dict[str, Any]) -> float | None:
    for field in ("LastModified", "mtime", "created"):
        value = info.get(field)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)):
            return float(value)
    return None


class FsspecObjectStore(ObjectStore):
    """Objects live at ``<root>/<key>`` on an fsspec filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self._async = isinstance(fs, AsyncFileSystem) and fs.async_impl

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._async:
            return await getattr(self.fs, f"_{name}")(*args, **kwargs)
        return await asyncio.to_thread(getattr(self.fs, name), *args, **kwargs)

    async def get(self, key: str) -> bytes:
        with translate_errors(self.url, key, "get"):
            data = await self._call("cat_file", self._path(key))
        return bytes(data)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        with translate_errors(self.url, key, "get_range"):
            data = await self._call("cat_file", self._path(key), start=start, end=end)
        return bytes(data)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        """Create-only writes are as atomic as the filesystem's ``mode="create"`` (fsspec >= 2024.12).

        Subclasses for S3 and memory make them atomic for sure; another
        filesystem may implement it as check-then-write.
        """
        path = self._path(key)
        with translate_errors(self.url, key, "put"):
            if not create_only:
                await self._call("pipe_file", path, data)
                return True
            try:
                await self._call("pipe_file", path, data, mode="create")
            except FileExistsError:
                return False
        return True

    async def head(self, key: str) -> ObjectMeta | None:
        with translate_errors(self.url, key, "head"):
            try:
                info = await self._call("info", self._path(key))
            except FileNotFoundError:
                return None
        if info.get("type") == "directory":
            return None
        return ObjectMeta(key, int(info.get("size") or 0), _mtime(info))

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        with translate_errors(self.url, prefix, "list"):
            try:
                found = await self._call("find", base, detail=True)
            except FileNotFoundError:
                return
        root = f"{self.root}/" if self.root else ""
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            key = path[len(root) :] if path.startswith(root) else path
            yield ObjectMeta(key, int(info.get("size") or 0), _mtime(info))

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        paths = [self._path(k) for k in keys]
        with translate_errors(self.url, keys[0], "delete"):
            try:
                await self._call("rm", paths)
            except FileNotFoundError:
                # Some filesystems (memory) stop at the first missing path: delete the rest one by one.
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        await self._call("rm_file", path)

    async def close(self) -> None:
        creator = getattr(self.fs, "_s3creator", None)
        if self._async and creator is not None:
            await creator.__aexit__(None, None, None)


class S3ObjectStore(FsspecObjectStore):
    """s3fs, with one request per HEAD and conditional create-only PUTs.

    s3fs's ``info`` follows a 404 with a LIST (a directory probe), so HEAD calls
    HeadObject itself. A create-only put is one PutObject with ``If-None-Match: *``:
    the server decides atomically, and 412 Precondition Failed means the object is
    there. (s3fs's own ``mode="create"`` reads 412 as "exists" only when the error
    names the condition, which Ceph RGW's does not.)
    """

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, _, object_key = self._path(key).partition("/")
        return bucket, object_key

    async def head(self, key: str) -> ObjectMeta | None:
        bucket, object_key = self._bucket_key(key)
        with translate_errors(self.url, key, "head"):
            try:
                resp = await self.fs._call_s3("head_object", Bucket=bucket, Key=object_key)
            except FileNotFoundError:
                return None
        modified = resp.get("LastModified")
        return ObjectMeta(key, int(resp.get("ContentLength", 0)), modified.timestamp() if modified else None)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        if not create_only:
            return await super().put(key, data)
        bucket, object_key = self._bucket_key(key)
        with translate_errors(self.url, key, "put"):
            try:
                await self.fs._call_s3("put_object", Bucket=bucket, Key=object_key, Body=data, IfNoneMatch="*")
            except FileExistsError:
                return False
            except OSError as exc:
                answer = http_answer(exc)
                if answer is None or answer.status != 412:
                    raise
                return False
        return True


class MemoryObjectStore(FsspecObjectStore):
    """``memory://`` with a HEAD that is one dict lookup and atomic create-only puts.

    fsspec's ``MemoryFileSystem.info`` scans every stored path for a directory
    first, which makes a lookup O(objects in the process); an object is a file
    in ``fs.store`` or nothing. Its create mode checks, then writes (two threads
    can both win); ``dict.setdefault`` decides in one step.
    """

    async def head(self, key: str) -> ObjectMeta | None:
        found = self.fs.store.get(self._path(key))
        if found is None:
            return None
        created = getattr(found, "created", None)
        return ObjectMeta(key, int(found.size), created.timestamp() if created is not None else None)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        if not create_only:
            return await super().put(key, data)
        path = self._path(key)
        candidate = MemoryFile(self.fs, path, data)
        return self.fs.store.setdefault(path, candidate) is candidate


_STORE_CLASSES: dict[str, type[FsspecObjectStore]] = {
    "s3": S3ObjectStore,
    "s3a": S3ObjectStore,
    "memory": MemoryObjectStore,
}


async def open_fsspec(url: str, storage_options: dict[str, Any] | None = None) -> FsspecObjectStore:
    """Create the filesystem for ``url`` inside the running loop (never from fsspec's cache).

    For ``s3://`` the botocore client gets kvstore's defaults (see
    ``kvstore.storage.s3_settings``): checksums only where required, no
    retries below kvstore's own, unsigned bodies over HTTPS, no SSL context over plain HTTP, and
    botocore's parsed service models shared by every store of the process.
    """
    protocol, _, _ = url.partition("://")
    cls = fsspec.get_filesystem_class(protocol)
    options = dict(storage_options or {})
    s3 = protocol in ("s3", "s3a")
    transport = options.pop(TRANSPORT_OPTION, "botocore")
    if transport not in TRANSPORTS or (transport != "botocore" and not s3):
        raise InvalidInputError(
            f"storage option {TRANSPORT_OPTION}={transport!r}: one of {list(TRANSPORTS)}, and 'crt' only for s3://"
        )
    if getattr(cls, "async_impl", False):
        options.setdefault("asynchronous", True)
        options.setdefault("skip_instance_cache", True)
        options.setdefault("use_listings_cache", False)  # other writers change the store under us
        if s3:
            options.setdefault("max_concurrency", 1)  # s3fs otherwise HEADs before every GET
    if s3:
        options["config_kwargs"] = botocore_config_kwargs(options.get("config_kwargs"), https=uses_https(options))
        options["client_kwargs"] = client_kwargs(options)
    try:
        fs = cls(**options)
    except TypeError as exc:  # an option the filesystem does not take
        raise InvalidInputError(f"cannot open {url!r} with these storage options: {exc}") from exc
    if s3:
        fs.retries = S3FS_RETRIES
        if fs.session is None:  # (a session the caller passed in is used as it is)
            fs.session = session_with_shared_loader(fs.kwargs)
    with translate_errors(url, "", "open"):
        if getattr(fs, "async_impl", False) and hasattr(fs, "set_session"):
            await fs.set_session()
    root = cls._strip_protocol(url)
    if isinstance(root, list):  # pragma: no cover - fsspec typing allows lists
        root = root[0]
    if transport == "crt":
        from kvstore.storage.s3_crt import CrtS3ObjectStore

        store = CrtS3ObjectStore(fs, str(root), url)
        try:
            await store.start_crt(options)
        except BaseException:
            await store.close()
            raise
        return store
    store_cls = _STORE_CLASSES.get(protocol, FsspecObjectStore)
    return store_cls(fs, str(root), url)
