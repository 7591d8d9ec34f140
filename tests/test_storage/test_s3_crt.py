"""The awscrt transport (``storage_options={"transport": "crt"}``) against moto and Ceph RGW.

Object bytes (GET, ranged GET, PUT) and HEADs travel through awscrt; listings and
deletes stay on s3fs. The store contract (the conformance suite), the request
count under failures, faults on the wire, signing and TLS are checked here;
tenants' permissions on RGW in tests/test_store/test_iam_rgw.py.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

import kvstore
from kvstore.errors import InvalidInputError, StorePermissionError, StoreUnavailableError
from kvstore.storage import ObjectStore, open_object_store
from kvstore.storage.fsspec_store import S3ObjectStore
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy
from kvstore.storage.s3_crt import CrtS3ObjectStore, _Guard, _PartsStream
from kvstore.storage.translation import http_answer, translate_error
from kvstore.testing.faultproxy import FaultProxy
from kvstore.testing.s3servers import SERVER_NAMES, S3Server

pytest.importorskip("awscrt.s3", reason="awscrt is not installed (the crt extra)")

import test_conformance  # the store contract, subclassed below for this transport

store = test_conformance.store  # the suite's fixture: the backend under test, opened in the test's loop

ATTEMPTS = 3
POLICY = RetryPolicy(attempts=ATTEMPTS, base_delay=0.0, max_delay=0.0, request_timeout=20.0, breaker_threshold=0)


def _crt(options: dict[str, Any] | None, **changes: Any) -> dict[str, Any]:
    return {**(options or {}), **changes, "transport": "crt"}


@pytest.fixture(params=SERVER_NAMES)
def backend(request: pytest.FixtureRequest) -> str:
    """Only the S3 servers: the crt transport is for s3:// stores."""
    name: str = request.param
    return name


@pytest.fixture
def store_url(store_url: Any) -> Any:
    """The S3 store under test, its object bytes through awscrt."""
    return store_url._replace(storage_options=_crt(store_url.storage_options))


class TestCrtConformance(test_conformance.TestObjectStoreConformance):
    """The ObjectStore contract, every test of it, with the crt transport."""

    async def test_the_store_is_the_crt_one(self, store: ObjectStore) -> None:
        assert isinstance(store, CrtS3ObjectStore)
        assert store.crt.sign_bodies  # plain HTTP: bodies in the signature

    async def test_heads_go_through_crt_and_say_what_botocore_says(
        self, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert isinstance(store, CrtS3ObjectStore)
        await store.put("dir/obj", b"v" * 1234)
        via_botocore = await S3ObjectStore.head(store, "dir/obj")

        async def no_botocore(*_: Any, **__: Any) -> Any:
            raise AssertionError("a HEAD went through s3fs")

        monkeypatch.setattr(store.fs, "_call_s3", no_botocore)
        assert await store.head("dir/obj") == via_botocore
        assert via_botocore is not None
        assert (via_botocore.size, via_botocore.mtime is not None) == (1234, True)
        assert await store.head("dir/missing") is None
        assert await store.head("dir") is None  # a "directory" is no object


# ---------------------------------------------------------------------- one retry layer, faults


@pytest.fixture
def via_proxy(proxy: FaultProxy, s3_store_url: Any) -> dict[str, Any]:
    return _crt(s3_store_url.storage_options, endpoint_url=proxy.url)


@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_a_broken_answer_is_store_unavailable_and_a_retry_reads_the_right_bytes(
    kind: str, proxy: FaultProxy, s3_store_url: Any, via_proxy: dict[str, Any]
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: a truncated answer is visibly short
    plain = await open_object_store(s3_store_url.url, via_proxy)
    resilient = ResilientObjectStore(await open_object_store(s3_store_url.url, via_proxy), POLICY)
    try:
        await plain.put("k", body)
        proxy.inject(kind, match="GET ")  # type: ignore[arg-type]
        with pytest.raises(StoreUnavailableError):
            await plain.get("k")
        proxy.inject(kind, match="GET ")  # type: ignore[arg-type]
        assert await resilient.get("k") == body
        assert proxy.stats.faults[kind] == 2
    finally:
        await plain.close()
        await resilient.close()


async def test_a_stalled_read_ends_at_once_when_timed_out_or_cancelled(
    proxy: FaultProxy, s3_store_url: Any, via_proxy: dict[str, Any]
) -> None:
    backend = await open_object_store(s3_store_url.url, via_proxy)
    policy = RetryPolicy(attempts=1, request_timeout=0.5, breaker_threshold=0)
    resilient = ResilientObjectStore(await open_object_store(s3_store_url.url, via_proxy), policy)
    try:
        await backend.put("k", b"v" * 1000)
        proxy.inject("stall", match="GET ")
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await resilient.get("k")  # the policy's timeout
        assert time.monotonic() - started < 5
        proxy.inject("stall", match="GET ")
        task = asyncio.create_task(backend.get("k"))
        await asyncio.sleep(0.3)
        task.cancel()  # the caller gives up
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1
        assert proxy.stats.faults["stall"] == 2
        assert await backend.get("k") == b"v" * 1000  # both clients still work
        assert await resilient.get("k") == b"v" * 1000
    finally:
        await backend.close()
        await resilient.close()


async def test_a_save_and_load_under_random_faults_is_exact_or_a_miss(
    proxy: FaultProxy,
    s3_store_url: Any,
    via_proxy: dict[str, Any],
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
    slice_kv: Callable[..., Any],
) -> None:
    from kvstore.testing.faultproxy import Fault

    spec = make_spec(num_layers=3)
    tokens = list(range(96))
    kv = make_kv(spec, len(tokens))
    retry = RetryPolicy(attempts=4, base_delay=0.0, max_delay=0.0, request_timeout=5.0, breaker_threshold=0)
    async with kvstore.open(s3_store_url.url, storage_options=via_proxy, chunk_tokens=16, retry=retry) as store:
        proxy.random_faults = (Fault("status", 503), Fault("reset"), Fault("truncate"))
        proxy.fault_rate = 0.2
        for _ in range(3):
            await store.save_prefix(spec, tokens, kv)
            hit = await store.load_prefix(spec, tokens)
            assert_kv_equal(hit.kv, slice_kv(kv, hit.num_tokens))  # a prefix, never other bytes
        proxy.fault_rate = 0.0
        hit = await store.load_prefix(spec, tokens)
    assert hit.num_tokens == len(tokens)
    assert_kv_equal(hit.kv, kv)
    assert sum(proxy.stats.faults.values()) > 0


# ---------------------------------------------------------------------- signing, TLS, permissions


def _put_content_hashes(proxy: FaultProxy) -> list[str]:
    hashes = []
    for head in proxy.stats.heads:
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].startswith("PUT "):
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            hashes.append({k.lower(): v for k, v in fields.items()}.get("x-amz-content-sha256", ""))
    return hashes


async def test_put_bodies_are_signed_over_plain_http(
    proxy: FaultProxy, s3_store_url: Any, via_proxy: dict[str, Any]
) -> None:
    backend = await open_object_store(s3_store_url.url, via_proxy)
    try:
        await backend.put("k", b"body")
        await backend.put_parts("parts", [memoryview(b"bo"), memoryview(b""), memoryview(b"dy")])
        assert await backend.get("parts") == b"body"
    finally:
        await backend.close()
    import hashlib

    assert _put_content_hashes(proxy) == [hashlib.sha256(b"body").hexdigest()] * 2


@pytest.mark.rgw
@pytest.mark.parametrize("backend", ["rgw"])
async def test_https_with_a_self_signed_certificate_and_unsigned_bodies(rgw_https: S3Server, store_url: Any) -> None:
    options = _crt(rgw_https.storage_options(rgw_https.https_endpoint))
    backend = await open_object_store(store_url.url, options)
    try:
        assert isinstance(backend, CrtS3ObjectStore)
        assert (backend.crt.https, backend.crt.sign_bodies) == (True, False)
        body = bytes(range(256)) * 1000
        assert await backend.put_parts("k", [memoryview(body[:1000]), memoryview(body[1000:])], create_only=True)
        assert await backend.get("k") == body
        assert await backend.get_range("k", 1000, 1010) == body[1000:1010]
    finally:
        await backend.close()


@pytest.mark.rgw
@pytest.mark.parametrize("backend", ["rgw"])
async def test_https_verifies_the_certificate(rgw_https: S3Server, store_url: Any) -> None:
    options = _crt(rgw_https.storage_options(rgw_https.https_endpoint))
    backend = await open_object_store(store_url.url, options)
    await backend.put("k", b"v")
    await backend.close()
    options["client_kwargs"] = {**options["client_kwargs"], "verify": True}  # the system's CAs only
    backend = await open_object_store(store_url.url, options)
    try:
        with pytest.raises(StoreUnavailableError) as info:
            await backend.get("k")
    finally:
        await backend.close()
    assert "TLS" in str(info.value) or "certificate" in str(info.value).lower()


@pytest.mark.rgw
@pytest.mark.parametrize("backend", ["rgw"])
async def test_a_wrong_secret_is_a_permission_error(rgw_server: S3Server, store_url: Any) -> None:
    options = _crt(store_url.storage_options, secret="wrong")
    backend = await open_object_store(store_url.url, options)
    try:
        with pytest.raises(StorePermissionError) as info:
            await backend.put("k", b"v")
    finally:
        await backend.close()
    assert info.value.status == 403
    assert info.value.code == "SignatureDoesNotMatch"


# ---------------------------------------------------------------------- options, pieces


async def test_the_transport_option_is_checked(moto_server: S3Server) -> None:
    options = moto_server.storage_options()
    with pytest.raises(InvalidInputError, match="transport"):
        await open_object_store("s3://bucket/kv", {**options, "transport": "curl"})
    with pytest.raises(InvalidInputError, match="only for s3://"):
        await open_object_store("memory://kv", {"transport": "crt"})
    with pytest.raises(InvalidInputError, match="s3_additional_kwargs"):
        await open_object_store(
            "s3://bucket/kv", _crt(options, s3_additional_kwargs={"ServerSideEncryption": "AES256"})
        )


async def test_without_awscrt_the_error_names_the_extra(moto_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "awscrt.s3", None)
    with pytest.raises(InvalidInputError, match=r"kvstore\[crt\]"):
        await open_object_store("s3://bucket/kv", _crt(moto_server.storage_options()))


def test_the_parts_stream_reads_and_seeks_across_parts() -> None:
    parts = [memoryview(b"abc"), memoryview(b""), memoryview(b"defgh"), memoryview(b"i")]
    stream = _PartsStream(parts, _Guard())
    assert stream.read() == b"abcdefghi"
    assert stream.seek(2) == 2
    buf = bytearray(4)
    assert stream.readinto(buf) == 4
    assert bytes(buf) == b"cdef"
    assert stream.seek(0, io.SEEK_END) == 9
    assert stream.readinto(buf) == 0


def test_a_closed_guard_stops_reads_of_caller_memory() -> None:
    guard = _Guard()
    stream = _PartsStream([memoryview(b"abc")], guard)
    guard.close()
    with pytest.raises(OSError, match="cancelled"):
        stream.readinto(bytearray(3))


def test_an_s3_error_answer_is_read_from_its_xml() -> None:
    from awscrt.s3 import S3ResponseError

    body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
    error = S3ResponseError(
        code=14343, name="AWS_ERROR_S3_INVALID_RESPONSE_STATUS", message="x", status_code=503, body=body
    )
    answer = http_answer(error)
    assert answer is not None
    assert (answer.status, answer.code, answer.message) == (503, "SlowDown", "Reduce your rate")
    translated = translate_error(error, url="s3://b/kv", key="k", operation="get")
    assert isinstance(translated, StoreUnavailableError)
    assert "HTTP 503 SlowDown: Reduce your rate" in str(translated)
    headless = S3ResponseError(code=1, name="n", message="m", status_code=404, body=None)
    assert isinstance(translate_error(headless, url="u", key="k"), kvstore.ObjectNotFoundError)


async def test_refreshable_credentials_are_refreshed_through_botocore_when_due() -> None:
    import datetime

    from aiobotocore.credentials import AioRefreshableCredentials

    from kvstore.storage.s3_crt import _Credentials

    refreshed: list[int] = []

    async def fetch() -> dict[str, str]:
        refreshed.append(1)
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)  # within the refresh window
        return {"access_key": f"key-{len(refreshed)}", "secret_key": "s", "token": "t", "expiry_time": soon.isoformat()}

    botocore_credentials = AioRefreshableCredentials.create_from_metadata(await fetch(), fetch, "test")
    delegate = _Credentials(botocore_credentials, asyncio.get_running_loop())
    await delegate.freeze()
    assert delegate().access_key_id == "key-2"  # on the loop's own thread: the frozen copy, no wait
    from_crt = await asyncio.to_thread(delegate)  # as crt calls it: due, so refreshed on the loop
    assert from_crt.access_key_id == "key-3"
    assert from_crt.session_token == "t"
