"""Recording which chunks a store used, for the GC's eviction by recency (docs/FORMAT.md, "Access records").

The hot path only writes into a dict (chunk-key prefix -> time) per model:
no request and no task per hit. A background task owned by the store writes
each model's batch as ONE access record every ``interval`` seconds, as soon as
a batch reaches its size bound, and on ``close()``. A failed write is counted
and logged, its entries go back into the batch (within the bound), and it is
never raised into a load or a save. A crash loses at most the unflushed batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable

import numpy as np

from kvstore.errors import KVStoreError
from kvstore.formats.access import AccessRecord, access_prefix, access_record_name
from kvstore.requests import Counters, Requests

__all__ = ["ACCESS_FLUSH_TASK", "DEFAULT_BATCH_ENTRIES", "DEFAULT_FLUSH_INTERVAL", "AccessRecorder", "wall_clock"]

logger = logging.getLogger("kvstore")

ACCESS_FLUSH_TASK = "kvstore-access-flush"
"""The name of a store's flushing task (one per store, alive until ``close()``)."""
DEFAULT_FLUSH_INTERVAL = 30.0
DEFAULT_BATCH_ENTRIES = 65536
"""Entries of one model's batch that trigger a flush; a batch never holds more than twice as many."""

wall_clock: Callable[[], float] = time.time
"""The clock uses are stamped with (tests replace it to make recency explicit)."""


class AccessRecorder:
    """Batches of chunk uses per model version, flushed as access records by a task of its own."""

    def __init__(
        self,
        requests: Requests,
        counters: Counters,
        *,
        interval: float = DEFAULT_FLUSH_INTERVAL,
        batch_entries: int = DEFAULT_BATCH_ENTRIES,
    ) -> None:
        self._requests = requests
        self._counters = counters
        self.interval = interval
        self.batch_entries = batch_entries
        self.writer = os.urandom(8)
        self._seq = 0
        self._batches: dict[bytes, dict[int, int]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def record(self, mid: bytes, digests: Iterable[bytes]) -> None:
        """Note a use of each chunk now (no I/O); starts the flushing task on first use."""
        if self._closed:
            return
        now = min(math.ceil(wall_clock()), (1 << 32) - 1)
        batch = self._batches.setdefault(mid, {})
        dropped = 0
        for d in digests:
            k = int.from_bytes(d[:8], "big")
            if k not in batch and len(batch) >= 2 * self.batch_entries:
                dropped += 1
                continue
            batch[k] = now
        if dropped:
            self._counters.access_entries_dropped += dropped
        self._ensure_task(wake=len(batch) >= self.batch_entries)

    def _ensure_task(self, *, wake: bool) -> None:
        if self._task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (never in kvstore's own calls): flushed by close()
                return
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name=ACCESS_FLUSH_TASK)
        if wake and self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write every pending batch now: one PUT per model version."""
        batches, self._batches = list(self._batches.items()), {}
        for i, (mid, batch) in enumerate(batches):
            if not batch:
                continue
            keys = np.fromiter(batch.keys(), np.uint64, len(batch))
            times = np.fromiter(batch.values(), np.uint32, len(batch))
            record = AccessRecord(mid, self.writer, keys, times)
            self._seq += 1
            name = access_prefix(mid) + access_record_name(record.last, self.writer, self._seq)
            try:
                await self._requests.put(name, record.to_msgpack())
            except asyncio.CancelledError:  # close() cancelled a flush in flight: it flushes again
                for m, b in batches[i:]:
                    self._put_back(m, b)
                raise
            except KVStoreError as exc:
                self._counters.access_flush_failures += 1
                logger.warning("could not write access record %s (kept for the next flush): %s", name, exc)
                self._put_back(mid, batch)
                continue
            self._counters.access_records_written += 1

    def _put_back(self, mid: bytes, batch: dict[int, int]) -> None:
        current = self._batches.setdefault(mid, {})
        for k, t in batch.items():
            if k in current:
                current[k] = max(current[k], t)
            elif len(current) < 2 * self.batch_entries:
                current[k] = t
            else:
                self._counters.access_entries_dropped += 1

    async def close(self) -> None:
        """Stop the task and write what is pending (once; failures are counted, not raised)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
