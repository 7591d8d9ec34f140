"""Tenant isolation on a real policy engine: Ceph RGW S3 users confined by a bucket policy.

The moto IAM tests (test_iam.py) cannot check what moto ignores: ``Condition``
blocks (there a tenant can list another's keys: a strict xfail). RGW evaluates
them, and shows what a prefix-scoped listing costs: without ``s3:ListBucket`` on
the whole bucket, a GET or HEAD of a missing key is answered 403, not 404, so
every miss looks like a refusal. Two buckets, each owned by the gateway's first
user (the admin): ``scoped`` grants each tenant ListBucket under its prefix only
(the listing is isolated, misses are 403), ``listable`` grants it on the bucket
(misses are 404, kvstore works; object access stays per namespace). RGW 16 also
refuses DeleteObjects as a whole to such tenants; the GC's bulk client then
deletes key by key.
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

import kvstore
from kvstore.errors import StorePermissionError
from kvstore.storage.s3_batch import S3BatchClient
from kvstore.testing.rgw import RadosGateway
from kvstore.testing.s3servers import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.rgw]

CRT = importlib.util.find_spec("awscrt") is not None
ROOT = "kv"
TOKENS = list(range(40))


class Tenants(NamedTuple):
    bucket: str
    admin: S3Server
    users: dict[str, S3Server]

    def url(self, namespace: str | None = None) -> str:
        base = f"s3://{self.bucket}/{ROOT}"
        return base if namespace is None else f"{base}/namespaces/{namespace}"

    def client(self, user: str) -> Any:
        return self.users[user].client()


def _policy(bucket: str, tenants: list[str], *, scoped_listing: bool) -> dict[str, Any]:
    """Per tenant: the objects of its own namespace, and a listing under its prefix (or of the bucket)."""
    statements: list[dict[str, Any]] = []
    for name in tenants:
        principal = {"AWS": [f"arn:aws:iam:::user/tenant-{name}"]}
        listing: dict[str, Any] = {
            "Effect": "Allow",
            "Principal": principal,
            "Action": ["s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}"],
        }
        if scoped_listing:
            listing["Condition"] = {"StringLike": {"s3:prefix": [f"{ROOT}/namespaces/{name}/*"]}}
        statements += [
            {
                "Effect": "Allow",
                "Principal": principal,
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{ROOT}/namespaces/{name}/*"],
            },
            listing,
        ]
    return {"Version": "2012-10-17", "Statement": statements}


@pytest.fixture(scope="module")
def tenants(rgw_gateway: RadosGateway, rgw_server: S3Server) -> Iterator[dict[str, Tenants]]:
    """``{"scoped": ..., "listable": ...}``: the same two tenants on a bucket of each policy."""
    users = {}
    for name in ("a", "b"):
        key, secret = f"tenant-{name}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        rgw_gateway.create_user(f"tenant-{name}", key, secret)
        users[name] = S3Server("rgw", rgw_server.endpoint, key, secret)
    admin = rgw_server.client()
    buckets = {}
    for kind in ("scoped", "listable"):
        bucket = f"kvtenants-{kind}-{uuid.uuid4().hex[:8]}"
        admin.create_bucket(Bucket=bucket)
        policy = _policy(bucket, list(users), scoped_listing=kind == "scoped")
        admin.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        buckets[kind] = Tenants(bucket, rgw_server, users)
    yield buckets
    for where in buckets.values():
        for page in admin.get_paginator("list_objects_v2").paginate(Bucket=where.bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                admin.delete_objects(Bucket=where.bucket, Delete={"Objects": keys})
        admin.delete_bucket(Bucket=where.bucket)


def _keys(tenants: Tenants, namespace: str) -> set[str]:
    prefix = f"{ROOT}/namespaces/{namespace}/"
    pages = tenants.admin.client().get_paginator("list_objects_v2").paginate(Bucket=tenants.bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


TRANSPORTS = ["botocore", pytest.param("crt", marks=pytest.mark.skipif(not CRT, reason="awscrt is not installed"))]


def _open(tenants: Tenants, user: str, namespace: str, transport: str = "botocore", **kwargs: Any) -> Any:
    options = {**tenants.users[user].storage_options(), "transport": transport}
    return kvstore.open(tenants.url(), storage_options=options, namespace=namespace, chunk_tokens=16, **kwargs)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_tenant_saves_and_loads_its_own_namespace(
    transport: str,
    tenants: dict[str, Tenants],
    make_spec: Callable[..., Any],
    make_kv: Callable[..., Any],
    assert_kv_equal: Callable[..., None],
) -> None:
    spec = make_spec(name=f"own-{transport}")  # the namespace outlives the test: a model of its own
    kv = make_kv(spec, len(TOKENS))
    async with _open(tenants["listable"], "a", "a", transport) as store:
        saved = await store.save_prefix(spec, TOKENS, kv)
        hit = await store.load_prefix(spec, TOKENS)
        assert store.stats().read_errors == 0
    assert saved.chunks_written == 3
    assert_kv_equal(hit.kv, kv)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_tenants_namespace_is_refused_at_once(
    transport: str, tenants: dict[str, Tenants], make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    where = tenants["listable"]
    spec = make_spec(name=f"b-only-{transport}")
    async with _open(where, "b", "b") as own:
        await own.save_prefix(spec, TOKENS, make_kv(spec, len(TOKENS)))
    before = _keys(where, "b")
    started = time.monotonic()
    with pytest.raises(StorePermissionError) as caught:
        await _open(where, "a", "b", transport)
    assert time.monotonic() - started < 5, "a refusal must not be retried"
    assert (caught.value.status, caught.value.code) == (403, "AccessDenied")
    assert _keys(where, "b") == before


def test_listing_is_scoped_by_the_s3_prefix_condition(tenants: dict[str, Tenants]) -> None:
    """What moto cannot check (its strict xfail): the Condition on ListBucket is enforced."""
    where = tenants["scoped"]
    client = where.client("a")
    client.put_object(Bucket=where.bucket, Key=f"{ROOT}/namespaces/a/mine", Body=b"x")
    own = client.list_objects_v2(Bucket=where.bucket, Prefix=f"{ROOT}/namespaces/a/")
    assert f"{ROOT}/namespaces/a/mine" in [o["Key"] for o in own.get("Contents", [])]
    for prefix in (f"{ROOT}/namespaces/b/", f"{ROOT}/", ""):
        with pytest.raises(Exception, match="AccessDenied"):
            client.list_objects_v2(Bucket=where.bucket, Prefix=prefix)


async def test_with_a_prefix_scoped_listing_a_missing_key_is_access_denied(tenants: dict[str, Tenants]) -> None:
    """The price of the scoped listing (README, S3-compatible servers): misses are 403, so kvstore cannot
    tell them from refusals; a new namespace cannot even be created. Pinned so the README stays true."""
    where = tenants["scoped"]
    with pytest.raises(StorePermissionError) as caught:
        await _open(where, "a", "a")
    assert (caught.value.operation, caught.value.key, caught.value.status) == ("get", "kvstore.msgpack", 403)
    with pytest.raises(Exception, match="403"):
        where.client("a").head_object(Bucket=where.bucket, Key=f"{ROOT}/namespaces/a/missing")


async def test_the_gc_deletes_key_by_key_when_delete_objects_is_refused(tenants: dict[str, Tenants]) -> None:
    """RGW refuses a prefix-confined tenant's DeleteObjects as a whole; each key is then deleted on its own."""
    where = tenants["listable"]
    admin = where.admin.client()
    mine = [f"namespaces/a/gc/{i}" for i in range(3)]
    theirs = "namespaces/b/gc/keep"
    for key in [*mine, theirs]:
        admin.put_object(Bucket=where.bucket, Key=f"{ROOT}/{key}", Body=b"x")
    with pytest.raises(Exception, match="AccessDenied"):  # the premise: the batch is refused as a whole
        where.client("a").delete_objects(Bucket=where.bucket, Delete={"Objects": [{"Key": f"{ROOT}/{mine[0]}"}]})
    async with S3BatchClient(where.url(), where.users["a"].storage_options()) as client:
        failures = await client.delete_objects([*mine, theirs])
    assert [(f.key, f.error.split(":")[0]) for f in failures] == [(theirs, "AccessDenied")]
    left = _keys(where, "a") | _keys(where, "b")
    assert f"{ROOT}/{theirs}" in left
    assert not {f"{ROOT}/{k}" for k in mine} & left
