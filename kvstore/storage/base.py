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

from kvstore._workers import in_worker
from kvstore.storage.translation import translate_errors

__all__ = ["ObjectMeta", "ObjectStore", "ReadPlan", "translate_errors"]


ReadPlan = Callable[[bytes], tuple[int, Sequence[memoryview]]]
"""Given an object's first bytes, where the rest goes: ``(start offset, buffers)`` (see ``get_planned``)."""


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
    """True when ``get_into`` / ``get_range_into`` read straight into caller memory (no intermediate copy)."""
    has_cache_tiers: bool = False
    """True when some reads may be served by a cache tier in front of the source (see ``drop_cached``)."""
    batches_heads: bool = False
    """True when ``head_many`` answers many keys in one call (a local directory: one worker-thread hop)."""
    writes_parts: bool = False
    """True when ``put_parts`` writes the parts as they are (``writev``); else it joins them into one buffer."""

    async def drop_cached(self, key: str) -> None:  # noqa: B027 - optional hook with a default
        """Forget any cached copy of ``key`` so the next read comes from the source (no-op without tiers)."""

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFoundError if it does not exist."""

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (fewer if it is shorter); ObjectNotFoundError if absent.

        Backends that can read a range without the whole object (S3's Range
        header, ``pread``) override this.
        """
        return (await self.get(key))[start:end]

    async def get_range_into(
        self, key: str, start: int, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        """Fill ``buffers`` in order from the object's bytes at ``start``; return how many bytes were filled.

        Fewer than the buffers hold means the object ended first. ``then(filled)``
        runs in the worker thread right after the read, while the bytes are still
        in the CPU cache (checksums); what it raises propagates. Backends that can
        scatter a read into caller memory (``preadv``) override this.
        """
        total = sum(len(b) for b in buffers)
        data = memoryview(await self.get_range(key, start, start + total))

        def fill() -> int:
            offset = 0
            for buf in buffers:
                n = min(len(buf), len(data) - offset)
                if n <= 0:
                    break
                buf[:n] = data[offset : offset + n]
                offset += n
            if then is not None:
                then(offset)
            return offset

        return await in_worker(fill)

    async def get_planned(
        self,
        key: str,
        head: int,
        plan: ReadPlan,
        *,
        then: Callable[[int], None] | None = None,
    ) -> tuple[bytes, int]:
        """Read the object's first ``head`` bytes, let ``plan(head_bytes)`` say where the rest goes, fill it.

        ``plan`` returns ``(start, buffers)``: the bytes from ``start`` are
        scattered into ``buffers`` as by ``get_range_into``, then ``then(filled)``
        runs. Returns the head bytes and how many bytes filled the buffers. A
        self-describing object (an index in its first bytes) is read this way
        with one request where the backend can (a local file: one worker-thread
        hop for both reads); this default makes two.
        """
        first = await self.get_range(key, 0, head)
        start, buffers = plan(first)
        return first, await self.get_range_into(key, start, buffers, then=then)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        """Store the concatenation of ``parts`` at ``key``, atomically for readers (``create_only`` as in ``put``).

        Backends that can write from several buffers (``writev``) override this
        to skip the concatenation copy.
        """
        return await self.put(key, b"".join(parts), create_only=create_only)

    @abstractmethod
    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        """Store ``data`` at ``key``, atomically for readers.

        With ``create_only`` an existing object is left alone and False is
        returned; otherwise (and when written) True.
        """

    @abstractmethod
    async def head(self, key: str) -> ObjectMeta | None:
        """Metadata of the object at ``key``, or None when there is none."""

    async def head_many(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        """``head`` of every key, in order. Backends that can answer many at once override this."""
        return list(await asyncio.gather(*(self.head(k) for k in keys)))

    @abstractmethod
    def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        """Stream every object whose key starts with ``prefix`` (a directory-like prefix)."""

    @abstractmethod
    async def delete(self, keys: Sequence[str]) -> None:
        """Delete objects; keys that do not exist are ignored."""

    async def close(self) -> None:  # noqa: B027 - optional hook with a default
        """Release connections; the store is unusable afterwards."""
