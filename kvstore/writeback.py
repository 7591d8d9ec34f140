"""Write-back: ``save_prefix(..., wait=False)`` returns once the KV is copied, and uploads in the background.

Decoding must not wait for an object store. A background save holds a private
host copy of the KV (the caller may reuse its buffers at once), counted against
a byte budget: when the queue is full, the next ``save_prefix`` waits instead of
growing memory. Until its upload finishes, a prompt is served to ``lookup`` and
``load_prefix`` of the same store from that copy (read-your-writes). Upload
errors are kept and raised by ``flush()`` / ``close()``: never lost silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import WriteBackError
from kvstore.results import LayerKV, SaveResult

__all__ = ["PendingMatch", "SaveHandle", "WriteBack"]

logger = logging.getLogger("kvstore")


@dataclass(slots=True)
class _Pending:
    model_id: bytes
    tokens: np.ndarray
    host: list[LayerKV]
    nbytes: int


@dataclass(frozen=True, slots=True)
class PendingMatch:
    """The part of a query that a background save still holds: ``num_tokens`` of ``host``."""

    num_tokens: int
    host: list[LayerKV]


class SaveHandle:
    """A background save: ``await`` it for the ``SaveResult`` (its error is raised there, not in ``flush``)."""

    def __init__(self, task: asyncio.Task[SaveResult | BaseException], writeback: WriteBack) -> None:
        self._task = task
        self._writeback = writeback

    def done(self) -> bool:
        return self._task.done()

    def __await__(self) -> Generator[Any, None, SaveResult]:
        return self._wait().__await__()

    async def _wait(self) -> SaveResult:
        outcome = await asyncio.shield(self._task)
        if isinstance(outcome, BaseException):
            self._writeback._claim_error(outcome)
            raise outcome
        return outcome


class WriteBack:
    """The queue of background saves of one store, bounded by ``budget`` bytes of host copies."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._room = asyncio.Condition()
        self._tasks: set[asyncio.Task[SaveResult | BaseException]] = set()
        self._pending: list[_Pending] = []
        self._errors: list[BaseException] = []

    async def submit(
        self,
        model_id: bytes,
        tokens: np.ndarray,
        copy: Callable[[], list[LayerKV]],
        nbytes: int,
        upload: Callable[[list[LayerKV]], Awaitable[SaveResult]],
    ) -> SaveHandle:
        """Wait for room, take the private copy (``copy``), then run ``upload(copy)`` in the background."""
        async with self._room:  # backpressure; a save larger than the budget goes alone
            await self._room.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.budget)
            self.used += nbytes
        try:
            host = await asyncio.to_thread(copy)
        except BaseException:
            await self._release(nbytes)
            raise
        entry = _Pending(model_id, tokens, host, nbytes)
        self._pending.append(entry)
        task = asyncio.create_task(self._run(entry, upload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return SaveHandle(task, self)

    async def _run(
        self, entry: _Pending, upload: Callable[[list[LayerKV]], Awaitable[SaveResult]]
    ) -> SaveResult | BaseException:
        try:
            return await upload(entry.host)
        except Exception as exc:  # kept for flush(), or for whoever awaits the handle
            logger.error("background save of %d tokens failed: %s", len(entry.tokens), exc)
            self._errors.append(exc)
            return exc
        finally:
            self._pending.remove(entry)
            await self._release(entry.nbytes)

    async def _release(self, nbytes: int) -> None:
        async with self._room:
            self.used -= nbytes
            self._room.notify_all()

    def _claim_error(self, exc: BaseException) -> None:
        if exc in self._errors:
            self._errors.remove(exc)

    def match(self, model_id: bytes, tokens: np.ndarray, chunk_tokens: int) -> PendingMatch | None:
        """The longest prefix of ``tokens`` a pending save holds, cut as the store will cut it.

        Like a stored hit it ends on a chunk boundary, or at the end of the saved
        prompt (its tail chunk) when the query extends the whole prompt.
        """
        best: PendingMatch | None = None
        for entry in self._pending:
            if entry.model_id != model_id:
                continue
            n = min(len(entry.tokens), len(tokens))
            differ = np.flatnonzero(entry.tokens[:n] != tokens[:n])
            common = int(differ[0]) if len(differ) else n
            if common < len(entry.tokens):
                common -= common % chunk_tokens
            if common > 0 and (best is None or common > best.num_tokens):
                best = PendingMatch(common, entry.host)
        return best

    async def flush(self) -> None:
        """Wait for every queued save; raise WriteBackError if any failed (and nobody awaited it)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._errors:
            errors, self._errors = self._errors, []
            raise WriteBackError(errors) from errors[0]
