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
import weakref
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import WriteBackError
from kvstore.gpu.transfers import Transfers
from kvstore.results import LayerKV, SaveResult

__all__ = ["PendingMatch", "SaveHandle", "WriteBack"]

logger = logging.getLogger("kvstore")


@dataclass(eq=False, slots=True)
class _Pending:
    model_id: bytes
    tokens: np.ndarray
    host: list[LayerKV]
    nbytes: int
    transfers: Transfers | None = None
    """Owns ``host``'s memory when it is leased (pinned buffers of a CUDA source)."""
    readers: int = 0
    """Live ``PendingMatch`` objects still referring to ``host``."""
    ended: bool = False
    uploaded: bool = False

    def unread(self) -> None:
        self.readers -= 1
        self.release_if_unused()

    def release_if_unused(self) -> None:
        """Give leased host memory back once the upload ended and no match refers to it any more."""
        if self.ended and self.readers == 0 and self.transfers is not None:
            transfers, self.transfers = self.transfers, None
            transfers.release(reuse=self.uploaded)  # a failed upload may have left a worker thread reading


@dataclass(frozen=True, slots=True, weakref_slot=True)
class PendingMatch:
    """The part of a query that a background save still holds: ``num_tokens`` of ``host``.

    ``host`` stays valid while this object lives, even past the upload: leased
    (pinned) memory goes back to its pool only once every match is gone.
    """

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

    @property
    def queued(self) -> int:
        """Background saves not finished yet (their bytes are ``used``)."""
        return len(self._tasks)

    async def submit(
        self,
        model_id: bytes,
        tokens: np.ndarray,
        copy: Callable[[], Awaitable[list[LayerKV]]],
        nbytes: int,
        upload: Callable[[list[LayerKV]], Awaitable[SaveResult]],
        transfers: Transfers | None = None,
    ) -> SaveHandle:
        """Wait for room, take the private copy (``await copy()``), then run ``upload(copy)`` in the background.

        ``transfers`` owns the copy's memory when it is leased (pinned, from a CUDA
        source): closed on failure, and released once the upload has ended and
        no ``match`` result refers to the copy any more.
        """
        async with self._room:  # backpressure; a save larger than the budget goes alone
            await self._room.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.budget)
            self.used += nbytes
        try:
            host = await copy()
        except BaseException:
            try:
                if transfers is not None:
                    await transfers.aclose()  # after the copies complete, even if they were cancelled
            finally:
                await self._release(nbytes)
            raise
        entry = _Pending(model_id, tokens, host, nbytes, transfers)
        self._pending.append(entry)
        task = asyncio.create_task(self._run(entry, upload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return SaveHandle(task, self)

    async def _run(
        self, entry: _Pending, upload: Callable[[list[LayerKV]], Awaitable[SaveResult]]
    ) -> SaveResult | BaseException:
        try:
            result = await upload(entry.host)
            entry.uploaded = True
            return result
        except Exception as exc:  # kept for flush(), or for whoever awaits the handle
            logger.error("background save of %d tokens failed: %s", len(entry.tokens), exc)
            self._errors.append(exc)
            return exc
        finally:
            self._pending.remove(entry)
            entry.ended = True
            entry.release_if_unused()
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
        best_entry: _Pending | None = None
        for entry in self._pending:
            if entry.model_id != model_id:
                continue
            n = min(len(entry.tokens), len(tokens))
            differ = np.flatnonzero(entry.tokens[:n] != tokens[:n])
            common = int(differ[0]) if len(differ) else n
            if common < len(entry.tokens):
                common -= common % chunk_tokens
            if common > 0 and (best is None or common > best.num_tokens):
                best, best_entry = PendingMatch(common, entry.host), entry
        if best is not None and best_entry is not None:
            best_entry.readers += 1  # the host memory outlives the upload while the match is alive
            weakref.finalize(best, best_entry.unread)
        return best

    async def flush(self) -> None:
        """Wait for every queued save; raise WriteBackError if any failed (and nobody awaited it)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._errors:
            errors, self._errors = self._errors, []
            raise WriteBackError(errors) from errors[0]
