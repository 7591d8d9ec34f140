"""Shared fixtures: the storage backends (memory, local directory, S3 on moto and on Ceph RGW) and KV helpers.

Stores are opened inside each test, never in a fixture: an s3fs filesystem is
bound to the event loop that created it, and async fixtures run in the session
loop while tests run in their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import pytest
import torch

import kvstore
from kvstore.storage import ObjectMeta, ObjectStore
from kvstore.testing.rgw import RadosGateway, missing_programs
from kvstore.testing.s3servers import S3Server, start_s3_server
from kvstore.testing.s3servers import rgw_server as rgw_server_info

S3_SERVERS = ("moto", "rgw")
"""The S3 servers every S3 test runs against: moto (a Python mock) and Ceph's RADOS Gateway (a real one)."""
BACKENDS = ["memory", "local", *S3_SERVERS]

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Settings from the developer's machine must not reach the test servers (or a real account).
_AWS_ENV_CLEARED = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL")
_RGW_OPT_OUT = "KVSTORE_TEST_RGW"
"""Set to ``skip`` to skip the RGW tests; otherwise they need Ceph (and fail in CI without it)."""


class StoreURL(NamedTuple):
    """Where a test's store lives: pass both to ``kvstore.open`` / ``open_object_store``."""

    url: str
    storage_options: dict[str, Any] | None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that runs against an S3 server ``s3`` and with the server's name (``moto`` / ``rgw``)."""
    for item in items:
        params = getattr(item, "callspec", None)
        if params is None:
            continue
        for name in ("backend", "s3_server"):
            server = params.params.get(name)
            if server in S3_SERVERS:
                item.add_marker(pytest.mark.s3)
                item.add_marker(getattr(pytest.mark, server))


# ---------------------------------------------------------------------- S3 servers (moto, Ceph RGW)


@pytest.fixture(scope="session")
def _aws_env() -> Iterator[None]:
    """The test credentials in the environment (both servers accept them), the developer's settings out."""
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    saved = {name: os.environ.get(name) for name in (*_AWS_ENV, *_AWS_ENV_CLEARED)}
    os.environ.update(_AWS_ENV)
    for name in _AWS_ENV_CLEARED:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def moto_server(_aws_env: None) -> Iterator[S3Server]:
    """A moto S3 server over HTTP on 127.0.0.1, on a free port, for the whole run."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with start_s3_server("moto") as server:
        yield server


@pytest.fixture(scope="session")
def rgw_gateway(_aws_env: None) -> Iterator[RadosGateway]:
    """A single-node Ceph RADOS Gateway on 127.0.0.1 (HTTP and HTTPS), started on first use, for the whole run.

    Without Ceph installed the RGW tests fail in CI (``CI`` set) and are skipped
    elsewhere; ``KVSTORE_TEST_RGW=skip`` skips them explicitly.
    """
    if os.environ.get(_RGW_OPT_OUT) == "skip":
        pytest.skip(f"{_RGW_OPT_OUT}=skip")
    missing = missing_programs()
    if missing:
        message = f"Ceph RGW tests need {', '.join(missing)}: apt-get install radosgw ceph-mon ceph-osd"
        if os.environ.get("CI"):
            pytest.fail(message + f" (or set {_RGW_OPT_OUT}=skip)")
        pytest.skip(message)
    with RadosGateway() as gateway:
        yield gateway


@pytest.fixture(scope="session")
def rgw_server(rgw_gateway: RadosGateway) -> S3Server:
    """How to reach the session's RGW as its first S3 user."""
    return rgw_server_info(rgw_gateway)


@pytest.fixture(params=S3_SERVERS)
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 server in turn (moto, then RGW); each starts once per run, on first use."""
    server: S3Server = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture
def s3_endpoint(s3_server: S3Server) -> str:
    """The plain-HTTP endpoint of the S3 server under test."""
    return s3_server.endpoint


@contextlib.contextmanager
def _fresh_bucket(server: S3Server) -> Iterator[StoreURL]:
    """A new bucket on ``server``, emptied and deleted afterwards, and the URL and options of a store in it."""
    bucket = f"kvtest-{uuid.uuid4().hex[:20]}"
    client = server.client()
    client.create_bucket(Bucket=bucket)
    try:
        yield StoreURL(f"s3://{bucket}/kv", server.storage_options())
    finally:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)
        client.close()


@pytest.fixture
def s3_store_url(s3_server: S3Server) -> Iterator[StoreURL]:
    """A fresh bucket on the S3 server under test, and the URL and options of a store inside it."""
    with _fresh_bucket(s3_server) as where:
        yield where


# ---------------------------------------------------------------------- every backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the storage backend under test: memory, local, moto or rgw (the last two: S3)."""
    name: str = request.param
    return name


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreURL]:
    """An empty store location on the backend under test, unique to this test."""
    if backend == "memory":
        root = f"/kvtest-{uuid.uuid4().hex}"
        yield StoreURL(f"memory://{root}/kv", None)
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
    elif backend == "local":
        yield StoreURL(str(tmp_path / "kv"), None)
    elif backend in S3_SERVERS:
        with _fresh_bucket(request.getfixturevalue(f"{backend}_server")) as where:
            yield where
    else:  # pragma: no cover - guards BACKENDS
        raise AssertionError(f"unknown backend {backend!r}: one of {BACKENDS} (S3 is 'moto' or 'rgw')")


# ---------------------------------------------------------------------- specs and KV tensors


def _make_spec(
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str = "tiny",
    version: str = "v1",
    num_layers: int = 2,
    num_kv_heads: int = 2,
    head_dim: int = 8,
) -> kvstore.ModelSpec:
    return kvstore.ModelSpec(name, version, num_layers, num_kv_heads, head_dim, dtype)


def _make_kv(spec: kvstore.ModelSpec, num_tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random, pairwise different K and V for every layer (float32 draws cast to the spec dtype)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, spec.num_kv_heads, spec.head_dim)

    def draw() -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(spec.dtype)

    return [(draw(), draw()) for _ in range(spec.num_layers)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def _assert_kv_equal(actual: Sequence[tuple[torch.Tensor, torch.Tensor]], expected: Sequence[Any]) -> None:
    """Bit-exact equality of per-layer (K, V), dtypes and shapes included."""
    assert len(actual) == len(expected)
    for layer, (got, want) in enumerate(zip(actual, expected, strict=True)):
        for name, g, w in zip("KV", got, want, strict=True):
            assert g.dtype == w.dtype, f"layer {layer} {name}: dtype {g.dtype} != {w.dtype}"
            assert g.shape == w.shape, f"layer {layer} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
            assert torch.equal(_bits(g), _bits(w)), f"layer {layer} {name}: bits differ"


def _slice_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[:n], v[:n]) for k, v in kv]


@pytest.fixture
def make_spec() -> Callable[..., kvstore.ModelSpec]:
    """``make_spec(dtype=bfloat16, *, name, version, num_layers=2, num_kv_heads=2, head_dim=8)``."""
    return _make_spec


@pytest.fixture
def make_kv() -> Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]:
    """``make_kv(spec, num_tokens, seed=0)``: random KV for ``spec``."""
    return _make_kv


@pytest.fixture
def slice_kv() -> Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]:
    """``slice_kv(kv, n)``: the KV of the first ``n`` tokens."""
    return _slice_kv


@pytest.fixture
def assert_kv_equal() -> Callable[..., None]:
    """``assert_kv_equal(actual, expected)``: bit-exact comparison of per-layer (K, V)."""
    return _assert_kv_equal


# ---------------------------------------------------------------------- instrumented backend


class CountingObjectStore(ObjectStore):
    """Delegates to a real ObjectStore and records calls and the peak number in flight.

    ``delay`` (seconds) holds every call open a little, so overlapping calls overlap for sure.
    """

    def __init__(self, inner: ObjectStore, delay: float = 0.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.reads_into_buffers = inner.reads_into_buffers
        self.delay = delay
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.peak = 0
        self.peak_by_op: Counter[str] = Counter()
        self._in_flight_by_op: Counter[str] = Counter()

    def reset(self) -> None:
        self.calls.clear()
        self.peak = 0
        self.peak_by_op.clear()

    def _enter(self, op: str) -> None:
        self.calls[op] += 1
        self.in_flight += 1
        self._in_flight_by_op[op] += 1
        self.peak = max(self.peak, self.in_flight)
        self.peak_by_op[op] = max(self.peak_by_op[op], self._in_flight_by_op[op])

    def _leave(self, op: str) -> None:
        self.in_flight -= 1
        self._in_flight_by_op[op] -= 1

    async def _hold(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    async def get(self, key: str) -> bytes:
        self._enter("get")
        try:
            await self._hold()
            return await self.inner.get(key)
        finally:
            self._leave("get")

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        self._enter("get")
        try:
            await self._hold()
            return await self.inner.get_range(key, start, end)
        finally:
            self._leave("get")

    async def get_range_into(
        self, key: str, start: int, buffers: Sequence[memoryview], *, then: Callable[[int], None] | None = None
    ) -> int:
        self._enter("get_into")
        try:
            await self._hold()
            return await self.inner.get_range_into(key, start, buffers, then=then)
        finally:
            self._leave("get_into")

    async def get_planned(
        self,
        key: str,
        head: int,
        plan: Callable[[bytes], tuple[int, Sequence[memoryview]]],
        *,
        then: Callable[[int], None] | None = None,
    ) -> tuple[bytes, int]:
        self._enter("get")
        try:
            await self._hold()
            return await self.inner.get_planned(key, head, plan, then=then)
        finally:
            self._leave("get")

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        self._enter("put")
        try:
            await self._hold()
            return await self.inner.put_parts(key, parts, create_only=create_only)
        finally:
            self._leave("put")

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        self._enter("put")
        try:
            await self._hold()
            return await self.inner.put(key, data, create_only=create_only)
        finally:
            self._leave("put")

    async def head(self, key: str) -> ObjectMeta | None:
        self._enter("head")
        try:
            await self._hold()
            return await self.inner.head(key)
        finally:
            self._leave("head")

    async def list(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        self._enter("list")
        try:
            await self._hold()
            async for meta in self.inner.list(prefix):
                yield meta
        finally:
            self._leave("list")

    async def delete(self, keys: Sequence[str]) -> None:
        self._enter("delete")
        try:
            await self._hold()
            await self.inner.delete(keys)
        finally:
            self._leave("delete")

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def counting_store() -> type[CountingObjectStore]:
    """The ``CountingObjectStore`` class: ``counting_store(inner, delay=0.0)``."""
    return CountingObjectStore
