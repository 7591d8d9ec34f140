"""Retries, timeouts and the circuit breaker: the policy on its own, then over real HTTP faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest

import kvstore
from kvstore.errors import CircuitOpenError, ObjectNotFoundError, StorePermissionError, StoreUnavailableError
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.storage import LocalObjectStore, ObjectMeta, ObjectStore
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy
from kvstore.testing.faultproxy import FaultProxy

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002, request_timeout=2.0, breaker_threshold=0)


class Flaky(ObjectStore):
    """Fails the next ``failures`` requests with ``error``, then delegates; can also hang."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.failures = 0
        self.error: Exception = StoreUnavailableError("injected")
        self.hang = False
        self.calls = 0

    async def _gate(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.failures:
            self.failures -= 1
            raise self.error

    async def get(self, key: str) -> bytes:
        await self._gate()
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        await self._gate()
        return await self.inner.put(key, data, create_only=create_only)

    async def head(self, key: str) -> ObjectMeta | None:
        await self._gate()
        return await self.inner.head(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        await self._gate()
        async for meta in self.inner.list(prefix):
            yield meta

    async def delete(self, keys: Sequence[str]) -> None:
        await self._gate()
        await self.inner.delete(keys)


@pytest.fixture
def flaky(tmp_path: Any) -> Flaky:
    return Flaky(LocalObjectStore(tmp_path))


async def test_transient_failures_are_retried_until_success(flaky: Flaky) -> None:
    store = ResilientObjectStore(flaky, FAST)
    await store.put("a", b"1")
    flaky.failures = 2
    assert await store.get("a") == b"1"
    assert (store.stats.retries, store.stats.failures, flaky.calls) == (2, 0, 4)


async def test_a_request_gives_up_after_its_attempts(flaky: Flaky) -> None:
    store = ResilientObjectStore(flaky, FAST)
    flaky.failures = 10
    with pytest.raises(StoreUnavailableError, match="injected"):
        await store.head("a")
    assert (flaky.calls, store.stats.failures) == (3, 1)


@pytest.mark.parametrize("error", [ObjectNotFoundError("gone"), StorePermissionError("denied")])
async def test_definite_answers_are_not_retried(flaky: Flaky, error: Exception) -> None:
    store = ResilientObjectStore(flaky, FAST)
    flaky.failures, flaky.error = 5, error
    with pytest.raises(type(error)):
        await store.get("a")
    assert flaky.calls == 1
    assert store.stats.retries == 0


async def test_a_hanging_request_times_out_and_is_retried(flaky: Flaky) -> None:
    policy = RetryPolicy(attempts=2, base_delay=0, request_timeout=0.05, breaker_threshold=0)
    store = ResilientObjectStore(flaky, policy)
    flaky.hang = True
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="no answer"):
        await store.get("a")
    assert time.monotonic() - t0 < 1.0
    assert (flaky.calls, store.stats.timeouts) == (2, 2)


async def test_listing_is_retried_before_its_first_entry(flaky: Flaky) -> None:
    store = ResilientObjectStore(flaky, FAST)
    await store.put("d/x", b"1")
    flaky.failures = 1
    assert [m.key async for m in store.list("d/")] == ["d/x"]
    assert store.stats.retries == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_circuit_opens_fails_fast_then_probes_and_closes(flaky: Flaky) -> None:
    clock = FakeClock()
    policy = RetryPolicy(attempts=1, base_delay=0, breaker_threshold=3, breaker_cooldown=10.0)
    store = ResilientObjectStore(flaky, policy, clock=clock)
    await store.put("a", b"1")
    flaky.failures = 3
    for _ in range(3):
        with pytest.raises(StoreUnavailableError):
            await store.get("a")
    assert store.breaker.is_open
    assert store.stats.circuit_opened == 1
    calls = flaky.calls
    with pytest.raises(CircuitOpenError):
        await store.get("a")
    assert flaky.calls == calls
    assert store.stats.fast_failures == 1

    clock.now = 11.0  # cool-down over: one probe goes out; it fails and the circuit opens again
    flaky.failures = 1
    with pytest.raises(StoreUnavailableError):
        await store.get("a")
    with pytest.raises(CircuitOpenError):
        await store.get("a")

    clock.now = 22.0  # the next probe succeeds and closes the circuit
    assert await store.get("a") == b"1"
    assert not store.breaker.is_open
    assert await store.get("a") == b"1"


@pytest.mark.parametrize("error", [ObjectNotFoundError("gone"), StorePermissionError("denied")])
async def test_refused_listings_never_open_the_circuit(flaky: Flaky, error: Exception) -> None:
    """A listing refused outright (another tenant's prefix) proves the store is up, as for any other request."""
    clock = FakeClock()
    store = ResilientObjectStore(flaky, RetryPolicy(attempts=3, breaker_threshold=2), clock=clock)
    await store.put("a", b"1")
    flaky.failures, flaky.error = 10, error
    for _ in range(5):
        with pytest.raises(type(error)):
            _ = [m async for m in store.list("d/")]
    assert flaky.calls == 1 + 5  # the put, then each listing once: never retried
    assert not store.breaker.is_open
    assert (store.stats.retries, store.stats.failures, store.stats.fast_failures) == (0, 0, 0)
    flaky.failures = 0
    assert await store.get("a") == b"1"


async def test_a_refused_probe_listing_closes_the_circuit(flaky: Flaky) -> None:
    clock = FakeClock()
    store = ResilientObjectStore(flaky, RetryPolicy(attempts=1, breaker_threshold=1, breaker_cooldown=1.0), clock=clock)
    flaky.failures = 1
    with pytest.raises(StoreUnavailableError):
        await store.get("a")
    assert store.breaker.is_open
    clock.now = 2.0  # the probe is a listing, refused: a definite answer
    flaky.failures, flaky.error = 1, StorePermissionError("denied")
    with pytest.raises(StorePermissionError):
        _ = [m async for m in store.list("d/")]
    assert not store.breaker.is_open
    with pytest.raises(ObjectNotFoundError):
        await store.get("a")


def test_policy_rejects_bad_values() -> None:
    for bad in ({"attempts": 0}, {"attempts": True}, {"base_delay": -1}, {"request_timeout": 0}):
        with pytest.raises(kvstore.InvalidInputError):
            RetryPolicy(**bad)
    with pytest.raises(kvstore.InvalidInputError):
        kvstore.open("x", retry="often")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- real HTTP faults (moto + proxy)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    port = int(s3_endpoint.rsplit(":", 1)[1])
    with FaultProxy(port) as p:
        yield p


def _through(proxy: FaultProxy, s3_store_url: Any) -> dict[str, Any]:
    """Storage options that send every request through ``proxy``, with botocore's own retries off."""
    return {
        **s3_store_url.storage_options,
        "endpoint_url": proxy.url,
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "read_timeout": 5},
    }


HTTP_POLICY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, request_timeout=3.0, breaker_threshold=0)


@pytest.mark.s3
@pytest.mark.parametrize(("kind", "status"), [("status", 503), ("status", 500), ("reset", 0), ("truncate", 0)], ids=str)
async def test_loads_survive_http_faults_bit_exact(
    proxy: FaultProxy,
    s3_store_url: Any,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
    kind: Any,
    status: int,
) -> None:
    spec = make_spec()
    tokens = list(range(40))
    kv = make_kv(spec, len(tokens))
    options = _through(proxy, s3_store_url)
    async with kvstore.open(s3_store_url.url, storage_options=options, chunk_tokens=16, retry=HTTP_POLICY) as store:
        proxy.inject(kind, 2, status=status, match="PUT ")
        saved = await store.save_prefix(spec, tokens, kv)
        assert saved.num_tokens == 40
        proxy.inject(kind, 3, status=status, match="GET ")
        hit = await store.load_prefix(spec, tokens)
    assert hit.num_tokens == 40
    assert hit.chunks_damaged == 0
    assert_kv_equal(hit.kv, kv)
    assert proxy.stats.faults[kind] == 5


@pytest.mark.s3
async def test_a_stalled_connection_costs_one_request_timeout(
    proxy: FaultProxy, s3_store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    spec = make_spec()
    tokens = list(range(16))
    policy = RetryPolicy(attempts=2, base_delay=0, request_timeout=0.5, breaker_threshold=0)
    options = _through(proxy, s3_store_url)
    async with kvstore.open(s3_store_url.url, storage_options=options, chunk_tokens=16, retry=policy) as store:
        await store.save_prefix(spec, tokens, make_kv(spec, 16))
        proxy.inject("stall", 1, match="HEAD ")
        t0 = time.monotonic()
        assert await store.lookup(spec, tokens) == 16
        assert 0.4 < time.monotonic() - t0 < 3.0
    assert proxy.stats.faults["stall"] == 1


@pytest.mark.s3
async def test_a_dead_endpoint_opens_the_circuit_and_then_fails_fast(
    proxy: FaultProxy, s3_store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    spec = make_spec()
    tokens = list(range(16))
    policy = RetryPolicy(attempts=1, base_delay=0, request_timeout=2.0, breaker_threshold=3, breaker_cooldown=30.0)
    options = _through(proxy, s3_store_url)
    async with kvstore.open(s3_store_url.url, storage_options=options, chunk_tokens=16, retry=policy) as store:
        await store.save_prefix(spec, tokens, make_kv(spec, 16))
        proxy.inject("reset", 1000)
        for _ in range(3):  # reads fail open: a miss, logged and counted
            assert await store.lookup(spec, tokens) == 0
            assert (await store.load_prefix(spec, tokens)).num_tokens == 0
        stats = store.stats()
        assert stats.circuit_opened == 1
        assert stats.read_errors >= 3
        sent = proxy.stats.requests
        t0 = time.monotonic()
        hit = await store.load_prefix(spec, tokens)
        assert hit.num_tokens == 0
        assert time.monotonic() - t0 < 0.5  # no network round trip, no timeout
        assert proxy.stats.requests == sent
        assert store.stats().fast_failures > stats.fast_failures
        with pytest.raises(CircuitOpenError):  # saves fail closed
            await store.save_prefix(spec, list(range(32)), make_kv(spec, 32))
        proxy.clear()


@pytest.mark.s3
async def test_a_load_deadline_returns_what_is_complete(
    proxy: FaultProxy,
    s3_store_url: Any,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec()
    tokens = list(range(64))
    kv = make_kv(spec, 64)
    policy = RetryPolicy(attempts=1, request_timeout=30.0, breaker_threshold=0)
    options = _through(proxy, s3_store_url)
    async with kvstore.open(s3_store_url.url, storage_options=options, chunk_tokens=16, retry=policy) as store:
        await store.save_prefix(spec, tokens, kv)
        key = chunk_keys(spec, normalize_tokens(tokens), 16)[1]
        path = s3_store_url.url.removeprefix("s3://") + "/" + data_path(model_id(spec), key.digest, key.num_tokens)
        proxy.inject("stall", 1, match=f"GET /{path} ")  # the second chunk's data object never arrives
        t0 = time.monotonic()
        hit = await store.load_prefix(spec, tokens, timeout=0.5)
        assert time.monotonic() - t0 < 3.0
        assert store.stats().loads_timed_out == 1
    # The chunk that stalled is incomplete: the hit stops before it, and what it holds is exact.
    n = hit.num_tokens
    assert n < 64
    assert n % 16 == 0
    assert_kv_equal(hit.kv, [(k[:n], v[:n]) for k, v in kv])
