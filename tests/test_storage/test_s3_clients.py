"""The S3 clients kvstore builds, against moto and Ceph RGW: one retry layer, HTTPS, checksums, server errors.

Defect 9: kvstore's RetryPolicy is the only retry layer (s3fs's 5 tries and
botocore's 3 are off), so a request that keeps failing costs exactly
``attempts`` requests on the wire. Issue 12: with default settings kvstore
works with S3-compatible servers that refuse botocore's aws-chunked uploads
(Ceph 16 over HTTPS), and every S3 error names the server's code and message.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import pytest

import kvstore
from kvstore.errors import StoreUnavailableError
from kvstore.storage import ObjectStore, open_object_store
from kvstore.storage.fsspec_store import S3ObjectStore
from kvstore.storage.resilient import ResilientObjectStore, RetryPolicy
from kvstore.storage.s3_batch import S3BatchClient
from kvstore.storage.s3_settings import botocore_config_kwargs, client_kwargs, uses_https
from kvstore.testing.faultproxy import FaultProxy
from kvstore.testing.s3servers import S3Server

CRT = importlib.util.find_spec("awscrt") is not None
ATTEMPTS = 3
TRANSPORTS = ["botocore", pytest.param("crt", marks=pytest.mark.skipif(not CRT, reason="awscrt is not installed"))]
"""How object bytes travel: s3fs/botocore, or awscrt (test_s3_crt.py has the rest of its tests)."""
POLICY = RetryPolicy(attempts=ATTEMPTS, base_delay=0.0, max_delay=0.0, request_timeout=20.0, breaker_threshold=0)


def _via(proxy: FaultProxy, where: Any, transport: str = "botocore") -> dict[str, Any]:
    """The store's options with the proxy as endpoint and ``transport``, nothing else changed (kvstore's defaults)."""
    return {**where.storage_options, "endpoint_url": proxy.url, "transport": transport}


async def _fails_after(proxy: FaultProxy, request: Callable[[], Any]) -> tuple[int, StoreUnavailableError]:
    """Requests that reached the proxy while ``request()`` ran against nothing but 503 SlowDown answers."""
    proxy.inject("status", 1000, status=503)
    before = proxy.stats.requests
    try:
        with pytest.raises(StoreUnavailableError) as info:
            await request()
    finally:
        proxy.clear()
    return proxy.stats.requests - before, info.value


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failing_request_is_sent_exactly_attempts_times(
    transport: str, proxy: FaultProxy, s3_store_url: Any
) -> None:
    backend: ObjectStore = ResilientObjectStore(
        await open_object_store(s3_store_url.url, _via(proxy, s3_store_url, transport)), POLICY
    )
    try:
        await backend.put("present", b"v")

        async def listing() -> None:
            async for _ in backend.list("present"):
                pass

        requests = {
            "get": lambda: backend.get("present"),
            "get_range": lambda: backend.get_range("present", 0, 1),
            "head": lambda: backend.head("present"),
            "put": lambda: backend.put("new", b"v"),
            "create-only put": lambda: backend.put("new", b"v", create_only=True),
            "list": listing,
            "delete": lambda: backend.delete(["present"]),
        }
        for name, request in requests.items():
            sent, error = await _fails_after(proxy, request)
            assert sent == ATTEMPTS, f"{name}: {sent} requests for {ATTEMPTS} attempts"
            assert error.status == 503, name
            # A HEAD's answer has no body: botocore names the error by its status, crt calls every 503 SlowDown.
            assert error.code == ("503" if name == "head" and transport == "botocore" else "SlowDown"), name
        assert await backend.get("present") == b"v"  # nothing was deleted or overwritten
        assert await backend.head("new") is None
    finally:
        await backend.close()


async def _quiet(proxy: FaultProxy, *, still: float = 0.3, limit: float = 10.0) -> None:
    """Wait until no request has reached ``proxy`` for ``still`` seconds."""
    deadline = time.monotonic() + limit
    seen = -1
    while proxy.stats.requests != seen and time.monotonic() < deadline:
        seen = proxy.stats.requests
        await asyncio.sleep(still)


async def test_a_save_and_a_load_under_503s_send_attempts_per_request(
    proxy: FaultProxy, s3_store_url: Any, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    spec = make_spec()
    tokens = list(range(16))
    options = _via(proxy, s3_store_url)
    async with kvstore.open(s3_store_url.url, storage_options=options, chunk_tokens=16, retry=POLICY) as store:
        sent, error = await _fails_after(proxy, lambda: store.save_prefix(spec, tokens, make_kv(spec, 16)))
        # The save's first round is two reads at once (the retirement record, the chain's one HEAD): each is
        # sent at most `attempts` times, and the save stops when one fails for good (the other is cancelled).
        assert ATTEMPTS <= sent <= 2 * ATTEMPTS
        assert error.code in ("SlowDown", "503")
        await _quiet(proxy)  # the cancelled read's request may still be on its way to the proxy
        started = time.monotonic()
        proxy.inject("status", 1000, status=503)
        before = proxy.stats.requests
        assert (await store.load_prefix(spec, tokens)).num_tokens == 0  # fails open: a miss
        assert proxy.stats.requests - before == ATTEMPTS
        assert time.monotonic() - started < 5
        proxy.clear()


async def test_the_gc_bulk_client_has_one_retry_layer_too(proxy: FaultProxy, s3_store_url: Any) -> None:
    async with S3BatchClient(s3_store_url.url, _via(proxy, s3_store_url)) as client:

        async def listing() -> None:
            async for _ in client.list_objects(""):
                pass

        sent, error = await _fails_after(proxy, listing)
    assert sent == RetryPolicy().attempts  # botocore's standard retries are its only layer
    assert error.status == 503
    assert "SlowDown" in str(error)


# ---------------------------------------------------------------------- HTTPS, checksums (RGW)


@pytest.mark.parametrize(
    ("options", "https"),
    [
        ({}, True),  # AWS's own endpoint
        ({"endpoint_url": "https://s3.example.com"}, True),
        ({"endpoint_url": "http://127.0.0.1:9000"}, False),
        ({"client_kwargs": {"endpoint_url": "HTTPS://s3.example.com"}}, True),
        ({"use_ssl": False}, False),
        ({"client_kwargs": {"use_ssl": False}}, False),
    ],
)
def test_which_clients_talk_tls(options: dict[str, Any], https: bool) -> None:
    assert uses_https(options) is https


def test_bodies_are_unsigned_over_https_only_and_the_users_setting_wins() -> None:
    assert botocore_config_kwargs(None, https=True)["s3"] == {"payload_signing_enabled": False}
    assert "s3" not in botocore_config_kwargs(None, https=False)
    path_style = {"s3": {"addressing_style": "path"}}
    assert botocore_config_kwargs(path_style, https=True)["s3"] == {
        "addressing_style": "path",
        "payload_signing_enabled": False,
    }
    assert path_style == {"s3": {"addressing_style": "path"}}  # the user's dict is not changed
    signed = {"s3": {"payload_signing_enabled": True}}
    assert botocore_config_kwargs(signed, https=True)["s3"] == {"payload_signing_enabled": True}


def test_plain_http_clients_build_no_ssl_context_and_the_users_setting_wins() -> None:
    http = {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}}
    assert client_kwargs(http) == {"region_name": "eu-west-1", "verify": False}
    assert http["client_kwargs"] == {"region_name": "eu-west-1"}  # the user's dict is not changed
    assert client_kwargs({}) == {}  # AWS's HTTPS endpoint: verified as botocore does
    assert client_kwargs({"endpoint_url": "https://s3.example.com"}) == {}
    assert client_kwargs({"use_ssl": False, "client_kwargs": {"verify": "/ca.pem"}}) == {"verify": "/ca.pem"}


async def test_every_store_shares_one_parsed_service_model_and_a_callers_session_is_kept(s3_store_url: Any) -> None:
    """botocore parses the S3 model's JSON per session (280 ms on the loop); kvstore's sessions share one loader."""
    from aiobotocore.session import AioSession

    first = await open_object_store(s3_store_url.url, s3_store_url.storage_options)
    second = await open_object_store(f"{s3_store_url.url}/other", s3_store_url.storage_options)
    own = AioSession()
    theirs = await open_object_store(s3_store_url.url, {**s3_store_url.storage_options, "session": own})
    try:
        assert isinstance(first, S3ObjectStore)
        assert isinstance(second, S3ObjectStore)
        assert isinstance(theirs, S3ObjectStore)
        loader = first.fs.session.get_component("data_loader")
        assert second.fs.session is not first.fs.session  # credentials and settings stay per store
        assert second.fs.session.get_component("data_loader") is loader
        assert theirs.fs.session is own  # the caller's session as it is
        await first.put("k", b"v")  # each client works with the shared loader
        await second.put("k", b"w")
        assert (await first.get("k"), await second.get("k")) == (b"v", b"w")
        meta = await theirs.head("k")
        assert meta is not None
        assert meta.size == 1
    finally:
        for store in (first, second, theirs):
            await store.close()


async def _put_body_hashes(url: str, options: dict[str, Any]) -> list[str]:
    """The ``X-Amz-Content-SHA256`` header of each PUT a default kvstore S3 backend sends (as on the wire)."""
    backend = await open_object_store(url, options)
    assert isinstance(backend, S3ObjectStore)
    sent: list[str] = []

    def record(request: Any, **_: Any) -> None:
        sent.append(request.headers["X-Amz-Content-SHA256"].decode())

    backend.fs.s3.meta.events.register("before-send.s3.PutObject", record)
    try:
        await backend.put("signed", b"v" * 5000)
        await backend.put("created", b"w" * 5000, create_only=True)
        assert await backend.get("created") == b"w" * 5000
    finally:
        await backend.close()
    return sent


@pytest.mark.rgw
@pytest.mark.parametrize("backend", ["rgw"])
async def test_put_bodies_are_unsigned_over_https_and_signed_over_http(rgw_https: S3Server, store_url: Any) -> None:
    over_tls = await _put_body_hashes(store_url.url, rgw_https.storage_options(rgw_https.https_endpoint))
    assert over_tls == ["UNSIGNED-PAYLOAD"] * 2
    plain = await _put_body_hashes(store_url.url, rgw_https.storage_options())
    assert len(plain) == 2
    assert all(len(h) == 64 and h != "UNSIGNED-PAYLOAD" for h in plain)  # the body's SHA-256, hex


@pytest.mark.rgw
@pytest.mark.parametrize("backend", ["rgw"])
async def test_default_settings_work_over_https_with_a_self_signed_certificate(
    rgw_https: S3Server,
    store_url: Any,
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
) -> None:
    options = rgw_https.storage_options(rgw_https.https_endpoint)
    assert options["client_kwargs"]["verify"] == rgw_https.ca_file
    spec = make_spec()
    tokens = list(range(40))
    kv = make_kv(spec, len(tokens))
    async with kvstore.open(store_url.url, storage_options=options, chunk_tokens=16) as store:
        saved = await store.save_prefix(spec, tokens, kv)
        assert saved.num_tokens == 40
        hit = await store.load_prefix(spec, tokens)
    assert_kv_equal(hit.kv, kv)
    async with S3BatchClient(store_url.url, options) as client:  # the GC's ListObjectsV2 and DeleteObjects
        keys = [m.key async for m in client.list_objects("")]
        assert len(keys) > 3
        assert await client.delete_objects(keys) == []
        assert [m async for m in client.list_objects("")] == []


@pytest.mark.rgw
@pytest.mark.parametrize("backend", ["rgw"])
async def test_https_verifies_the_certificate(rgw_https: S3Server, store_url: Any) -> None:
    options = rgw_https.storage_options(rgw_https.https_endpoint)
    del options["client_kwargs"]["verify"]
    with pytest.raises(StoreUnavailableError) as info:
        await kvstore.open(store_url.url, storage_options=options, retry=None)
    assert "certificate verify failed" in str(info.value).lower() or "SSL" in str(info.value)


@pytest.mark.rgw
@pytest.mark.parametrize("backend", ["rgw"])
async def test_the_servers_refusal_of_aws_chunked_uploads_is_shown(rgw_https: S3Server, store_url: Any) -> None:
    # What kvstore avoids by default: botocore's checksum trailer, which Ceph 16 refuses over HTTPS.
    options = rgw_https.storage_options(rgw_https.https_endpoint)
    options["config_kwargs"] = {"request_checksum_calculation": "when_supported"}
    backend = await open_object_store(store_url.url, options)
    try:
        with pytest.raises(StoreUnavailableError) as info:
            await backend.put("k", b"v")
    finally:
        await backend.close()
    err = info.value
    assert (err.status, err.code) in ((411, "MissingContentLength"), (400, "XAmzContentSHA256Mismatch"))
    assert err.operation == "put"
    assert err.key == "k"
    assert f"HTTP {err.status} {err.code}" in str(err)
