"""One read per stored object at a time: concurrent loads of overlapping prefixes share it.

Requests for a common system prompt arrive together; without sharing, each load
would GET the same data objects. The first load to ask for an object owns the
read; loads asking while it is in flight register their destination buffers and
wait. The owner, once its bytes are read and verified, copies them into every
waiting buffer before it releases anything, so a follower never reads memory
that may be reused. An owner that fails or is cancelled wakes its followers
with ``False``: each then reads the object itself, so one load's failure or
cancellation never becomes another's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SharedReads"]

Buffers = Sequence[np.ndarray]
"""The flat uint8 destination views of one object's bytes (K then V)."""


@dataclass(slots=True)
class _Read:
    followers: list[tuple[Buffers, asyncio.Future[bool]]] = field(default_factory=list)


class SharedReads:
    """The reads in flight, by object path. Lives on the event loop's thread (no locks)."""

    def __init__(self) -> None:
        self._reads: dict[str, _Read] = {}

    def __len__(self) -> int:
        return len(self._reads)

    def follow(self, path: str, dest: Buffers) -> asyncio.Future[bool] | None:
        """Join the read of ``path`` in flight (a future: True once ``dest`` is filled), or own it (None).

        An owner must end with ``deliver`` or ``abandon``, whatever happens.
        """
        read = self._reads.get(path)
        if read is None:
            self._reads[path] = _Read()
            return None
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        read.followers.append((dest, waiter))
        return waiter

    def deliver(self, path: str, src: Buffers) -> int:
        """The owner read and verified ``src``: fill every follower's buffers; how many were served.

        The copies run here, on the loop's thread, before the owner can release
        ``src``: a chunk is a few MiB to a few tens of MiB, so a memcpy per
        follower costs less than a thread hand-off and leaves no copy racing a reuse.
        """
        read = self._reads.pop(path, None)
        if read is None:
            return 0
        served = 0
        for dest, waiter in read.followers:
            if waiter.done():  # the follower was cancelled
                continue
            for d, s in zip(dest, src, strict=True):
                np.copyto(d, s)
            waiter.set_result(True)
            served += 1
        return served

    def abandon(self, path: str) -> None:
        """The owner failed or was cancelled: its followers read the object themselves."""
        read = self._reads.pop(path, None)
        if read is None:
            return
        for _, waiter in read.followers:
            if not waiter.done():
                waiter.set_result(False)
