"""The store a connector talks to: one ``KVStore`` on one event-loop thread per process and configuration.

vLLM builds the scheduler-side and the worker-side connector separately, and in one
process when the engine runs a single worker (the usual case). Sharing the store
between them lets the worker claim the prefetch that the scheduler started as soon as
it knew the hit. The table of shared runtimes is the only process-wide state; each
entry is reference-counted and closed when its last connector shuts down.

Opening never blocks vLLM: it runs in the background, and while the store is not
open (or cannot be reached) every lookup is a miss; a failed open is retried after
``REOPEN_AFTER_S``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import kvstore
from kvstore._loop import LoopThread
from kvstore.errors import KVStoreError
from kvstore.integrations.vllm.config import ConnectorConfig
from kvstore.store import KVStore

__all__ = ["CLOSE_TIMEOUT_S", "REOPEN_AFTER_S", "StoreRuntime", "acquire_runtime", "release_runtime"]

logger = logging.getLogger("kvstore.vllm")

T = TypeVar("T")

REOPEN_AFTER_S = 10.0
"""Seconds between attempts to open a store that could not be opened."""
CLOSE_TIMEOUT_S = 60.0
"""Longest a shutdown waits for background saves to finish uploading."""


class StoreRuntime:
    """An event-loop thread and the store opened on it (None while not open)."""

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self._loop = LoopThread()
        self._store: KVStore | None = None
        self._opening: concurrent.futures.Future[KVStore] | None = None
        self._failed_at = -REOPEN_AFTER_S
        self._lock = threading.RLock()  # an open that is already done runs its callback in the caller
        self.has_worker = False
        """A worker-side connector of this process uses this runtime (so scheduler prefetches get claimed)."""

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop thread; the future is its result."""
        return self._loop.submit(coro)

    def store(self) -> KVStore | None:
        """The open store, or None while it is opening or unreachable (an open is then started, at most every 10 s)."""
        with self._lock:
            if self._store is not None:
                return self._store
            if self._opening is None and time.monotonic() - self._failed_at >= REOPEN_AFTER_S:
                self._opening = self._loop.submit(self._open())
                self._opening.add_done_callback(self._opened)
            return None

    async def store_within(self, seconds: float) -> KVStore | None:
        """On the loop: the store, waiting up to ``seconds`` for an open in flight."""
        store = self.store()
        opening = self._opening
        if store is None and opening is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(opening)), seconds)
            except (TimeoutError, KVStoreError, OSError):
                return None
        return store

    async def _open(self) -> KVStore:
        return await kvstore.open(self.config.url, **self.config.open_options)

    def _opened(self, fut: concurrent.futures.Future[KVStore]) -> None:
        with self._lock:
            self._opening = None
            exc = fut.exception()
            if exc is None:
                self._store = fut.result()
                return
            self._failed_at = time.monotonic()
        logger.warning(
            "kvstore %s could not be opened (every request is a miss until it can): %s", self.config.url, exc
        )

    def close(self) -> None:
        """Wait (bounded) for background saves, close the store and stop the loop thread."""
        store, self._store = self._store, None
        if store is not None:
            try:
                self._loop.run(asyncio.wait_for(_flush_and_close(store), CLOSE_TIMEOUT_S))
            except (TimeoutError, KVStoreError, OSError) as exc:
                logger.warning("kvstore %s: closing lost unsaved KV: %s", self.config.url, exc)
        self._loop.stop()


async def _flush_and_close(store: KVStore) -> None:
    try:
        await store.flush()
    finally:
        await store.close()


_RUNTIMES: dict[str, tuple[StoreRuntime, int]] = {}
_RUNTIMES_LOCK = threading.Lock()


def _key(config: ConnectorConfig) -> str:
    return json.dumps([config.url, config.open_options], sort_keys=True, default=str)


def acquire_runtime(config: ConnectorConfig) -> StoreRuntime:
    """The runtime for ``config`` in this process, created on first use; pair with ``release_runtime``."""
    key = _key(config)
    with _RUNTIMES_LOCK:
        runtime, count = _RUNTIMES.get(key, (None, 0))
        if runtime is None:
            runtime = StoreRuntime(config)
        _RUNTIMES[key] = (runtime, count + 1)
    runtime.store()  # start opening now
    return runtime


def release_runtime(runtime: StoreRuntime) -> None:
    """Drop one reference; the last one flushes and closes the store."""
    key = _key(runtime.config)
    with _RUNTIMES_LOCK:
        entry = _RUNTIMES.get(key)
        if entry is None or entry[0] is not runtime:
            return
        count = entry[1] - 1
        if count:
            _RUNTIMES[key] = (runtime, count)
            return
        del _RUNTIMES[key]
    runtime.close()


@atexit.register
def _close_all() -> None:
    """Engines that exit without shutting their connectors down still upload what they queued."""
    with _RUNTIMES_LOCK:
        runtimes = [runtime for runtime, _ in _RUNTIMES.values()]
        _RUNTIMES.clear()
    for runtime in runtimes:
        runtime.close()
