"""Retries, per-request timeouts and a circuit breaker around any ObjectStore.

Object stores throttle (503 SlowDown), time out and reset connections. A cache in
the inference path must turn that into a short delay or a fast failure, never a
hang: every request gets a timeout, transient failures are retried with capped
exponential backoff and full jitter, and after ``breaker_threshold`` consecutive
failures the store is skipped for ``breaker_cooldown`` seconds (requests fail at
once with CircuitOpenError), then one probe request decides whether it is back.

Only StoreUnavailableError and timeouts are retried. A definite answer (not
found, access denied, damaged data) is returned at once and counts as proof that
the store is up. Every operation kvstore issues is idempotent (content-addressed
writes, create-only records, deletes), so a retry after a lost reply is safe.

A timeout cannot stop a backend's worker thread (a blocked ``preadv`` or
``writev``), only stop waiting for it. So a request whose thread works on the
caller's buffers (``get_range_into`` and ``put_parts`` of a backend that reads
into buffers, i.e. local files) is never left behind: past its timeout it is
counted as timed out and waited for, and its late answer is used (or retried
as any other). Otherwise a late thread would write into buffers the caller
got back and reused (a pinned pool hands them to the next load), or publish
bytes from them. Other backends touch the caller's buffers only outside any
timeout: ``put_parts`` joins them before its request, ``get_range_into`` fills
them after its (retried) ``get_range``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvstore.errors import (
    CircuitOpenError,
    InvalidInputError,
    KVStoreError,
    StorePermissionError,
    StoreUnavailableError,
)
from kvstore.storage.base import ObjectMeta, ObjectStore, ReadPlan

__all__ = ["CircuitBreaker", "ResilientObjectStore", "RetryPolicy", "RetryStats"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try one request before giving up, and when to stop trying at all."""

    attempts: int = 4
    """Tries per request, the first included."""
    base_delay: float = 0.05
    """Backoff before retry n is uniform in [0, min(max_delay, base_delay * 2**n)] seconds."""
    max_delay: float = 2.0
    request_timeout: float | None = 30.0
    """Seconds one request may take (None: no limit)."""
    breaker_threshold: int = 8
    """Consecutive failed requests that open the circuit (0 disables the breaker)."""
    breaker_cooldown: float = 5.0
    """Seconds an open circuit fails requests at once before one probe is let through."""

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise InvalidInputError(f"RetryPolicy.attempts must be an int >= 1, got {self.attempts!r}")
        if isinstance(self.breaker_threshold, bool) or not isinstance(self.breaker_threshold, int):
            raise InvalidInputError("RetryPolicy.breaker_threshold must be an int")
        if self.breaker_threshold < 0:
            raise InvalidInputError("RetryPolicy.breaker_threshold must be >= 0")
        for name in ("base_delay", "max_delay", "breaker_cooldown"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise InvalidInputError(f"RetryPolicy.{name} must be a number >= 0, got {value!r}")
        timeout = self.request_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidInputError(f"RetryPolicy.request_timeout must be a positive number or None, got {timeout!r}")

    def backoff(self, retry: int) -> float:
        """Full-jitter delay before retry number ``retry`` (0-based)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2.0**retry))


@dataclass(slots=True)
class RetryStats:
    """What the resilience layer did, for store statistics and logs."""

    retries: int = 0
    failures: int = 0
    """Requests that failed after all their attempts."""
    timeouts: int = 0
    fast_failures: int = 0
    """Requests refused at once because the circuit was open."""
    circuit_opened: int = 0


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → half-open after ``cooldown``.

    Half-open lets one probe through; its success closes the circuit, its failure
    opens it again for another cooldown.
    """

    def __init__(self, threshold: int, cooldown: float, stats: RetryStats, clock: Callable[[], float]) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._stats = stats
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def before_request(self, url: str) -> bool:
        """Raise CircuitOpenError when the request must not go out; True when it is the half-open probe."""
        if self._open_until is None:
            return False
        if self._clock() < self._open_until or self._probing:
            self._stats.fast_failures += 1
            raise CircuitOpenError(f"{url}: skipped after {self._failures} consecutive failures (circuit open)")
        self._probing = True
        return True

    def success(self, probe: bool) -> None:
        if probe:
            self._probing = False
        self._failures = 0
        self._open_until = None

    def failure(self, probe: bool) -> None:
        if probe:
            self._probing = False
        self._failures += 1
        if self._threshold and self._failures >= self._threshold:
            if self._open_until is None:
                self._stats.circuit_opened += 1
            self._open_until = self._clock() + self._cooldown


class ResilientObjectStore(ObjectStore):
    """An ObjectStore that retries, times out and breaks the circuit for ``inner``."""

    def __init__(
        self, inner: ObjectStore, policy: RetryPolicy | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.url = inner.url
        self.reads_into_buffers = inner.reads_into_buffers
        self.has_cache_tiers = inner.has_cache_tiers
        self.batches_heads = inner.batches_heads
        self.writes_parts = inner.writes_parts
        self.stats = RetryStats()
        self.breaker = CircuitBreaker(self.policy.breaker_threshold, self.policy.breaker_cooldown, self.stats, clock)

    async def _request(self, key: str, attempt: Callable[[], Awaitable[T]], *, on_buffers: bool = False) -> T:
        """``attempt()`` under the policy. ``on_buffers``: it reads into or writes from the caller's buffers in a
        worker thread, which a timeout cannot stop: it is then waited for (see ``_unabandoned``), never left behind.
        """
        policy = self.policy
        for n in range(policy.attempts):
            probe = self.breaker.before_request(self.url)
            try:
                if on_buffers:
                    result = await self._unabandoned(attempt)
                else:
                    async with asyncio.timeout(policy.request_timeout):
                        result = await attempt()
            except TimeoutError:
                self.stats.timeouts += 1
                error: StoreUnavailableError = StoreUnavailableError(
                    f"{self.url}: no answer for {key!r} within {policy.request_timeout} s"
                )
            except StoreUnavailableError as exc:
                if not _transient(exc):
                    self.breaker.success(probe)  # a definite refusal: the store is up
                    raise
                error = exc
            except KVStoreError:
                self.breaker.success(probe)  # not found, damaged data: a definite answer
                raise
            except BaseException:
                if probe:
                    self.breaker.failure(probe)  # cancelled probe: let another one through later
                raise
            else:
                self.breaker.success(probe)
                return result
            self.breaker.failure(probe)
            if n + 1 == policy.attempts or self.breaker.is_open:
                self.stats.failures += 1
                raise error
            self.stats.retries += 1
            await asyncio.sleep(policy.backoff(n))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _unabandoned(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` to its end even past the request timeout, so no thread of it outlives the request.

        A timeout is counted but does not cancel: a worker thread in ``preadv`` or
        ``writev`` would go on writing into (or publishing from) buffers that the
        caller has got back and reused. The late answer is then used, or retried
        as any other. Only the caller's own cancellation cancels it (a load that
        is cancelled never reuses its buffers).
        """
        task = asyncio.ensure_future(attempt())
        try:
            done, _ = await asyncio.wait([task], timeout=self.policy.request_timeout)
            if not done:
                self.stats.timeouts += 1
                await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()
            raise
        return task.result()

    async def get(self, key: str) -> bytes:
        return await self._request(key, lambda: self.inner.get(key))

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        return await self._request(key, lambda: self.inner.put(key, data, create_only=create_only))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._request(key, lambda: self.inner.get_range(key, start, end))

    async def get_range_into(
        self, key: str, start: int, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        if not self.inner.reads_into_buffers:  # a retried get_range, then one copy in a thread no timeout gives up
            return await super().get_range_into(key, start, buffers, then=then)
        return await self._request(
            key, lambda: self.inner.get_range_into(key, start, buffers, then=then), on_buffers=True
        )

    async def get_planned(
        self,
        key: str,
        head: int,
        plan: ReadPlan,
        *,
        then: Callable[[int], None] | None = None,
    ) -> tuple[bytes, int]:
        if not self.inner.reads_into_buffers:  # the base get_planned: a get_range and a get_range_into, each retried
            return await super().get_planned(key, head, plan, then=then)
        return await self._request(key, lambda: self.inner.get_planned(key, head, plan, then=then), on_buffers=True)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        if not self.inner.writes_parts:  # the base put_parts: it joins the parts before any request
            return await super().put_parts(key, parts, create_only=create_only)
        return await self._request(
            key, lambda: self.inner.put_parts(key, parts, create_only=create_only), on_buffers=True
        )

    async def head(self, key: str) -> ObjectMeta | None:
        return await self._request(key, lambda: self.inner.head(key))

    async def head_many(self, keys: Sequence[str]) -> list[ObjectMeta | None]:
        if not self.inner.batches_heads:  # one retried request per key
            return await super().head_many(keys)
        return await self._request(keys[0] if keys else "", lambda: self.inner.head_many(keys))

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        """Retried until the first entry arrives; a failure after that propagates (no duplicates)."""
        policy = self.policy
        for n in range(policy.attempts):
            probe = self.breaker.before_request(self.url)
            started = False
            try:
                async for meta in self.inner.list(prefix):
                    if not started:
                        started = True
                        self.breaker.success(probe)
                    yield meta
            except StoreUnavailableError as exc:
                if not _transient(exc):
                    self.breaker.success(probe)  # a definite refusal: the store is up (as in _request)
                    raise
                self.breaker.failure(probe)
                if started or n + 1 == policy.attempts or self.breaker.is_open:
                    self.stats.failures += 1
                    raise
                self.stats.retries += 1
                await asyncio.sleep(policy.backoff(n))
                continue
            except KVStoreError:
                self.breaker.success(probe)  # damaged or missing data: a definite answer
                raise
            except BaseException:
                if probe and not started:
                    self.breaker.failure(probe)  # cancelled probe: let another one through later
                raise
            if not started:
                self.breaker.success(probe)
            return

    async def delete(self, keys: Sequence[str]) -> None:
        await self._request(keys[0] if keys else "", lambda: self.inner.delete(keys))

    async def drop_cached(self, key: str) -> None:
        await self.inner.drop_cached(key)

    async def close(self) -> None:
        await self.inner.close()


def _transient(exc: StoreUnavailableError) -> bool:
    """Worth retrying: unavailability, but not access denied or an open circuit."""
    return not isinstance(exc, (StorePermissionError, CircuitOpenError))
