"""The storage boundary: keys and bytes only, and nothing above it sees a backend error.

Keys are '/'-separated paths relative to the store root. Implementations
translate backend I/O and service errors into kvstore's tree with
``translate_errors`` (kvstore/storage/translation.py).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from kvstore.storage.translation import translate_errors

__all__ = ["ObjectMeta", "ObjectStore", "translate_errors"]


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a HEAD or a listing tells about one object."""

    key: str
    size: int
    mtime: float | None


class ObjectStore(ABC):
    """Async object-store operations used by kvstore: get, put, head, list, delete."""

    url: str
    reads_into_buffers: bool = False
    """True when ``get_into`` reads straight into caller memory (no intermediate copy)."""

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFoundError if it does not exist."""

    async def get_into(
        self, key: str, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        """Fill ``buffers`` in order from the object's bytes; return the object's size.

        The object must be exactly as large as the buffers together; a size
        mismatch is returned (not raised) so callers decide. ``then(size)`` runs
        in the worker thread right after the read, while the bytes are still in
        the CPU cache (checksums); what it raises propagates. Backends that can
        read straight into caller memory override this to skip a copy.
        """
        data = memoryview(await self.get(key))

        def fill() -> None:
            if len(data) == sum(len(b) for b in buffers):
                offset = 0
                for buf in buffers:
                    buf[:] = data[offset : offset + len(buf)]
                    offset += len(buf)
            if then is not None:
                then(len(data))

        await asyncio.to_thread(fill)
        return len(data)

    async def put_parts(self, key: str, parts: Sequence[memoryview]) -> None:
        """Store the concatenation of ``parts`` at ``key`` (overwrite), atomically for readers.

        Backends that can write from several buffers (``writev``) override this
        to skip the concatenation copy.
        """
        await self.put(key, b"".join(parts))

    @abstractmethod
    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        """Store ``data`` at ``key``, atomically for readers.

        With ``create_only`` an existing object is left alone and False is
        returned; otherwise (and when written) True.
        """

    @abstractmethod
    async def head(self, key: str) -> ObjectMeta | None:
        """Metadata of the object at ``key``, or None when there is none."""

    @abstractmethod
    def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        """Stream every object whose key starts with ``prefix`` (a directory-like prefix)."""

    @abstractmethod
    async def delete(self, keys: Sequence[str]) -> None:
        """Delete objects; keys that do not exist are ignored."""

    async def close(self) -> None:  # noqa: B027 - optional hook with a default
        """Release connections; the store is unusable afterwards."""
