"""A byte-budgeted pool of host buffers (pinned, for CUDA copies), reused across calls.

Pinning memory (``cudaHostAlloc``) costs milliseconds and synchronizes the
device, so a copy path that pins per call loses most of what pinning gains.
The pool keeps released buffers by size class and hands them out again; it
never holds more than ``budget`` bytes of them (in use plus cached). A request
that cannot fit gets plain pageable memory instead (counted as an overflow):
copies from it are slower, never wrong, and the budget is never exceeded.

Buffers are released from the event loop's thread and from executor threads
(after a copy completes), so the bookkeeping is under one lock; allocation
itself runs outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["MIN_SIZE_CLASS", "Allocator", "HostBlock", "HostPool", "PoolStats", "size_class", "tensor_nbytes"]

MIN_SIZE_CLASS = 64 << 10
"""The smallest buffer the pool allocates; smaller requests share this class."""

Allocator = Callable[[int], torch.Tensor]
"""Allocates a flat uint8 CPU tensor of exactly that many bytes (pinned, for the CUDA pools)."""


def size_class(nbytes: int) -> int:
    """The buffer size serving ``nbytes``: four classes per power of two, so at most 25% is wasted.

    Equal requests (every layer of a prompt has the same shape) land in one
    class, so a released buffer serves the next request of its kind.
    """
    if nbytes <= MIN_SIZE_CLASS:
        return MIN_SIZE_CLASS
    step = 1 << ((nbytes - 1).bit_length() - 3)
    return -(-nbytes // step) * step


@dataclass(eq=False, slots=True)
class HostBlock:
    """One buffer handed out by ``HostPool.acquire``: ``tensor`` is flat uint8 of ``size`` bytes.

    ``pooled`` is False for an overflow buffer (pageable, outside the budget):
    releasing it just drops it.
    """

    tensor: torch.Tensor
    size: int
    pinned: bool
    pooled: bool

    def view(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` over the first bytes of the buffer (no copy)."""
        nbytes = tensor_nbytes(shape, dtype)
        return self.tensor[:nbytes].view(dtype).view(shape)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool: bytes allocated (in use + cached), in use, cached, and counters."""

    budget: int
    allocated_bytes: int
    in_use_bytes: int
    cached_bytes: int
    allocations: int
    reuses: int
    overflows: int
    evictions: int


@dataclass(slots=True)
class _Counts:
    allocated: int = 0
    in_use: int = 0
    allocations: int = 0
    reuses: int = 0
    overflows: int = 0
    evictions: int = 0
    free: dict[int, list[HostBlock]] = field(default_factory=dict)


class HostPool:
    """Host buffers by size class within ``budget`` bytes; ``allocate`` makes new ones (pinned in production).

    ``pinned`` says what ``allocate`` returns, so copies know whether they may
    run asynchronously from it. Tests inject a plain allocator to check the
    bookkeeping without CUDA.
    """

    def __init__(self, budget: int, allocate: Allocator, *, pinned: bool = True) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget must be an int >= 0, got {budget!r}")
        self.budget = budget
        self.pinned = pinned
        self._allocate = allocate
        self._lock = threading.Lock()
        self._c = _Counts()
        self._lent: set[int] = set()  # ids of the pooled blocks handed out

    def acquire(self, nbytes: int) -> HostBlock:
        """A buffer of at least ``nbytes``: a cached one of its class, a new one within the budget, or overflow."""
        size = size_class(nbytes)
        c = self._c
        with self._lock:
            cached = c.free.get(size)
            if cached:
                block = cached.pop()
                c.reuses += 1
                return self._lend(block)
            if not self._make_room(size):
                c.overflows += 1
                return HostBlock(torch.empty(nbytes, dtype=torch.uint8), nbytes, pinned=False, pooled=False)
            c.allocated += size  # reserved now, allocated below without holding the lock
            c.allocations += 1
        try:
            tensor = self._allocate(size)
        except BaseException:
            with self._lock:
                c.allocated -= size
            raise
        with self._lock:
            return self._lend(HostBlock(tensor, size, pinned=self.pinned, pooled=True))

    def release(self, block: HostBlock) -> None:
        """Give ``block`` back for reuse. Only once no copy or reader uses its memory any more."""
        if not block.pooled:
            return
        with self._lock:
            self._take_back(block)
            self._c.free.setdefault(block.size, []).append(block)

    def discard(self, block: HostBlock) -> None:
        """Give ``block``'s bytes back to the budget without reusing its memory.

        For buffers a cancelled read may still be writing into (a worker thread
        cannot be stopped): the memory is freed when its last user lets go, and
        is never handed to anyone else.
        """
        if not block.pooled:
            return
        with self._lock:
            self._take_back(block)
            self._c.allocated -= block.size

    def clear(self) -> None:
        """Free every cached buffer (buffers in use are unaffected)."""
        with self._lock:
            for blocks in self._c.free.values():
                self._c.allocated -= sum(b.size for b in blocks)
            self._c.free.clear()

    def stats(self) -> PoolStats:
        with self._lock:
            c = self._c
            cached = sum(b.size for blocks in c.free.values() for b in blocks)
            return PoolStats(
                self.budget, c.allocated, c.in_use, cached, c.allocations, c.reuses, c.overflows, c.evictions
            )

    def _lend(self, block: HostBlock) -> HostBlock:
        self._c.in_use += block.size
        self._lent.add(id(block))
        return block

    def _take_back(self, block: HostBlock) -> None:
        if id(block) not in self._lent:
            raise ValueError("this buffer is not lent by this pool (released twice?)")
        self._lent.remove(id(block))
        self._c.in_use -= block.size

    def _make_room(self, size: int) -> bool:
        """Free cached buffers, largest classes first, until ``size`` more bytes fit the budget."""
        c = self._c
        cached = sum(b.size for blocks in c.free.values() for b in blocks)
        if c.allocated - cached + size > self.budget:
            return False  # the buffers in use alone leave no room: keep the cache
        for cls in sorted(c.free, reverse=True):
            blocks = c.free[cls]
            while blocks and c.allocated + size > self.budget:
                c.allocated -= blocks.pop().size
                c.evictions += 1
        return c.allocated + size <= self.budget


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor of ``shape`` and ``dtype``."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n
