"""Tenant isolation enforced by the object store: IAM users whose policies reach only their own namespace.

A moto server of its own runs in a child process with authentication switched on
(``/moto-api/reset-auth``): moto's auth switch and its backends are process-wide,
so switching them in this process would lock the session's open S3 server out.
An admin (an IAM user allowed everything) creates the bucket, the tenants'
users and policies, and writes a shared namespace; the tenants then go through
kvstore's public API and CLI only.

What moto 5.2.5 enforces here: the signature, and each object request (GET, HEAD,
PUT, DELETE of one key) against the user's Allow statements with ``*`` wildcards
in ``Resource``. What it does not: ``Condition`` blocks of user policies (so
``s3:prefix`` does not scope ListBucket: a tenant can list another's keys, a
strict xfail below), and per-key checks of DeleteObjects (it authorizes the batch
against the bucket ARN, so prefix-scoped users cannot bulk-delete at all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner

import kvstore
from kvstore.cli.main import cli
from kvstore.errors import StorePermissionError
from kvstore.opening import namespace_url

pytestmark = [pytest.mark.s3, pytest.mark.moto]
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server", reason="moto[server] is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed")

BUCKET = "kvtenants"
ROOT = "kv"
URL = f"s3://{BUCKET}/{ROOT}"
TOKENS = list(range(40))

_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the test process closes the pipe (or dies)
server.stop()
"""


class Tenants(NamedTuple):
    """The authenticating server and each user's access key and secret."""

    endpoint: str
    keys: dict[str, tuple[str, str]]

    def options(self, user: str) -> dict[str, Any]:
        key, secret = self.keys[user]
        return {
            "endpoint_url": self.endpoint,
            "key": key,
            "secret": secret,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def client(self, service: str, user: str | None = None) -> Any:
        key, secret = self.keys[user] if user else ("setup", "setup")
        return boto3.client(
            service, endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=key, aws_secret_access_key=secret,
        )  # fmt: skip


def _tenant_policy(namespace: str) -> dict[str, Any]:
    """Read-write on its own namespace, read-only on ``shared``: what a real deployment would grant."""
    own = f"arn:aws:s3:::{BUCKET}/{ROOT}/namespaces/{namespace}/*"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], "Resource": own},
            {
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{BUCKET}/{ROOT}/namespaces/shared/*",
            },
            {
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:aws:s3:::{BUCKET}",
                "Condition": {
                    "StringLike": {"s3:prefix": [f"{ROOT}/namespaces/{namespace}/*", f"{ROOT}/namespaces/shared/*"]}
                },
            },
        ],
    }


_ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@pytest.fixture(scope="module")
def tenants() -> Iterator[Tenants]:
    """A moto server that checks every request's signature and IAM policy, with admin, tenant-a and tenant-b."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://"), "the moto server did not start"
        setup = Tenants(endpoint, {})
        iam, s3 = setup.client("iam"), setup.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        keys: dict[str, tuple[str, str]] = {}
        policies = {"admin": _ADMIN_POLICY, "tenant-a": _tenant_policy("a"), "tenant-b": _tenant_policy("b")}
        policies["tenant-r"] = _tenant_policy("r")  # its policy is revoked by a test
        for user, policy in policies.items():
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="kvstore", PolicyDocument=json.dumps(policy))
            created = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (created["AccessKeyId"], created["SecretAccessKey"])
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:  # from now on every request is checked
            assert json.load(reply)["status"] == "ok"
        yield Tenants(endpoint, keys)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a wedged server
            proc.kill()
            proc.wait()


def _open(tenants: Tenants, user: str, namespace: str, **kwargs: Any) -> Any:
    return kvstore.open(URL, storage_options=tenants.options(user), namespace=namespace, chunk_tokens=16, **kwargs)


def _keys_under(tenants: Tenants, namespace: str) -> set[str]:
    prefix = f"{ROOT}/namespaces/{namespace}/"
    pages = tenants.client("s3", "admin").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"].removeprefix(prefix) for page in pages for obj in page.get("Contents", [])}


def test_the_server_really_checks_credentials(tenants: Tenants) -> None:
    """Guards the premise: unknown keys and out-of-policy keys are refused by the server itself."""
    stranger = boto3.client(
        "s3", endpoint_url=tenants.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    with pytest.raises(Exception, match="InvalidAccessKeyId"):
        stranger.list_objects_v2(Bucket=BUCKET)
    with pytest.raises(Exception, match="AccessDenied"):
        tenants.client("s3", "tenant-a").put_object(Bucket=BUCKET, Key=f"{ROOT}/namespaces/b/x", Body=b"x")


async def test_a_tenant_saves_and_loads_its_own_namespace_bit_exactly(
    tenants: Tenants, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    spec = make_spec()
    kv = make_kv(spec, len(TOKENS))
    async with _open(tenants, "tenant-a", "a") as store:
        saved = await store.save_prefix(spec, TOKENS, kv)
        hit = await store.load_prefix(spec, TOKENS)
        stats = store.stats()
    assert saved.chunks_written == 3
    assert hit.num_tokens == len(TOKENS)
    assert_kv_equal(hit.kv, kv)
    assert stats.read_errors == 0
    assert all(not k.startswith("namespaces/") for k in _keys_under(tenants, "a"))


@pytest.mark.parametrize("fail_open", [True, False])
async def test_opening_another_tenants_namespace_is_a_clean_permission_error(
    tenants: Tenants, make_spec: Callable[..., Any], make_kv: Callable[..., Any], fail_open: bool
) -> None:
    spec = make_spec()
    async with _open(tenants, "tenant-b", "b") as own:  # b's store exists ...
        await own.save_prefix(spec, TOKENS, make_kv(spec, len(TOKENS)))
    before = _keys_under(tenants, "b")
    started = time.monotonic()
    with pytest.raises(StorePermissionError, match="access denied") as caught:  # ... and a cannot even open it
        await _open(tenants, "tenant-a", "b", fail_open=fail_open)
    assert time.monotonic() - started < 5, "a refusal must not be retried"
    assert isinstance(caught.value.__cause__, PermissionError)  # s3fs's translation of the 403, kept as the cause
    assert _keys_under(tenants, "b") == before


async def test_a_tenant_reads_the_shared_namespace_but_cannot_write_it(
    tenants: Tenants, make_spec: Callable[..., Any], make_kv: Callable[..., Any], assert_kv_equal: Callable[..., None]
) -> None:
    spec = make_spec(name="shared-system-prompt")
    kv = make_kv(spec, len(TOKENS), seed=3)
    async with _open(tenants, "admin", "shared") as admin:
        await admin.save_prefix(spec, TOKENS, kv)
    before = _keys_under(tenants, "shared")
    async with _open(tenants, "tenant-a", "shared", create=False) as shared:
        hit = await shared.load_prefix(spec, TOKENS)
        assert_kv_equal(hit.kv, kv)
        other = make_spec(name="tenant-a-private")
        with pytest.raises(StorePermissionError):
            await shared.save_prefix(other, TOKENS, make_kv(other, len(TOKENS)))
        stats = shared.stats()
    assert stats.retries == 0, "access denied must not be retried"
    assert _keys_under(tenants, "shared") == before


async def test_the_same_prompt_in_two_namespaces_writes_two_sets_of_objects(
    tenants: Tenants, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    spec = make_spec(name="same-prompt")
    kv = make_kv(spec, len(TOKENS), seed=5)
    written = {}
    for user, namespace in (("tenant-a", "a"), ("tenant-b", "b")):
        before = _keys_under(tenants, namespace)
        async with _open(tenants, user, namespace) as store:
            assert await store.lookup(spec, TOKENS) == 0  # never a hit from the other tenant's copy
            result = await store.save_prefix(spec, TOKENS, kv)
        assert result.chunks_written == 3
        assert result.chunks_skipped == 0
        written[namespace] = _keys_under(tenants, namespace) - before
    records = {ns: {k for k in keys if k.startswith("access/")} for ns, keys in written.items()}
    assert [len(r) for r in records.values()] == [1, 1]  # each store's access record (named by its writer id)
    assert written["a"] - records["a"]
    assert written["a"] - records["a"] == written["b"] - records["b"]  # the same relative layout, stored twice


async def test_a_revoked_policy_turns_loads_into_counted_misses_and_saves_into_errors(
    tenants: Tenants, make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    """Credentials that lose access while a store is open: reads fail open, writes fail closed, nothing retried."""
    spec = make_spec(name="revoked")
    kv = make_kv(spec, len(TOKENS))
    async with _open(tenants, "tenant-r", "r") as store:
        await store.save_prefix(spec, TOKENS, kv)
        tenants.client("iam", "admin").delete_user_policy(UserName="tenant-r", PolicyName="kvstore")
        started = time.monotonic()
        assert await store.lookup(spec, TOKENS) == 0
        miss = await store.load_prefix(spec, TOKENS)
        assert miss.num_tokens == 0
        assert all(k.shape[0] == v.shape[0] == 0 for k, v in miss.kv)
        other = list(range(100, 140))
        with pytest.raises(StorePermissionError):
            await store.save_prefix(spec, other, make_kv(spec, len(other)))
        elapsed = time.monotonic() - started
        stats = store.stats()
    assert stats.read_errors >= 2  # the lookup and the load, each counted and logged
    assert stats.retries == 0
    assert elapsed < 5


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _cli_options(tenants: Tenants, user: str) -> list[str]:
    key, secret = tenants.keys[user]
    pairs = [
        f"endpoint_url={tenants.endpoint}",
        f"key={key}",
        f"secret={secret}",
        "client_kwargs.region_name=us-east-1",
    ]
    return [arg for pair in pairs for arg in ("--storage-option", pair)]


@pytest.mark.parametrize("command", [["info"], ["ls"], ["gc", "--yes"], ["verify"]])
def test_cli_on_another_tenants_namespace_prints_one_line_and_fails(
    tenants: Tenants, make_spec: Callable[..., Any], make_kv: Callable[..., Any], command: list[str]
) -> None:
    spec = make_spec(name="cli")
    url = str(namespace_url(URL, "b"))  # kvstore.sync.open has no namespace= (yet)
    with kvstore.sync.open(url, storage_options=tenants.options("tenant-b"), chunk_tokens=16) as own:
        own.save_prefix(spec, TOKENS, make_kv(spec, len(TOKENS)))
    before = _keys_under(tenants, "b")
    result = _cli(*command, url, *_cli_options(tenants, "tenant-a"))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("kvstore: error:")
    assert "denied" in lines[0].lower()
    assert "Traceback" not in result.output
    assert _keys_under(tenants, "b") == before


def test_cli_on_its_own_namespace_works(tenants: Tenants) -> None:
    result = _cli("info", str(namespace_url(URL, "a")), *_cli_options(tenants, "tenant-a"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["chunk_tokens"] == 16


@pytest.mark.xfail(strict=True, reason="moto 5.2.5 ignores Condition blocks: s3:prefix does not scope ListBucket")
def test_listing_is_scoped_by_the_s3_prefix_condition(tenants: Tenants) -> None:
    """On AWS this holds; if moto starts evaluating conditions, this xfail turns into a failure to update."""
    client = tenants.client("s3", "tenant-a")
    with pytest.raises(Exception, match="AccessDenied"):
        client.list_objects_v2(Bucket=BUCKET, Prefix=f"{ROOT}/namespaces/b/")
