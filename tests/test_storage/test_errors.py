"""Defect 11: the storage boundary translates I/O and service errors only, and errors say what failed.

A bug (TypeError, AttributeError, ...) must propagate as itself: translated into
a retriable StoreUnavailableError it would be retried and then, with fail_open,
counted as a cache miss, hiding the bug.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError

import kvstore
from kvstore.errors import ObjectNotFoundError, StorageError, StorePermissionError, StoreUnavailableError
from kvstore.storage import LocalObjectStore, open_object_store
from kvstore.storage.translation import translate_error, translate_errors

URL = "s3://bucket/kv"


def _client_error(status: int, code: str, message: str | None = None, operation: str = "GetObject") -> ClientError:
    error = {"Code": code, **({"Message": message} if message is not None else {})}
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def _translated(exc: BaseException, operation: str = "get") -> StorageError | None:
    return translate_error(exc, url=URL, key="chunks/k", operation=operation)


# ---------------------------------------------------------------------- what is translated, into what


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionResetError(104, "Connection reset by peer"), StoreUnavailableError),
        (TimeoutError(), StoreUnavailableError),
        (FileNotFoundError("chunks/k"), ObjectNotFoundError),
        (PermissionError("read-only"), StorePermissionError),
        (_client_error(503, "SlowDown", "Please reduce your request rate."), StoreUnavailableError),
        (_client_error(500, "InternalError", "oops"), StoreUnavailableError),
        (_client_error(403, "AccessDenied", "no"), StorePermissionError),
        (_client_error(404, "NoSuchKey", "gone"), ObjectNotFoundError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), StoreUnavailableError),
        (NoCredentialsError(), StorePermissionError),
        (aiohttp.ServerDisconnectedError(), StoreUnavailableError),
        (aiohttp.ClientPayloadError("truncated"), StoreUnavailableError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_io_and_service_errors_are_translated(exc: BaseException, expected: type[StorageError]) -> None:
    translated = _translated(exc)
    assert type(translated) is expected
    assert (translated.url, translated.operation, translated.key) == (URL, "get", "chunks/k")


@pytest.mark.parametrize(
    "exc",
    [
        TypeError("unsupported operand"),
        AttributeError("'NoneType' object has no attribute 'read'"),
        KeyError("Body"),
        ValueError("bad"),
        AssertionError(),
        ParamValidationError(report="Unknown parameter in input: 'IfNoneMatch'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_programming_errors_are_not_translated(exc: BaseException) -> None:
    assert _translated(exc) is None
    with pytest.raises(type(exc)), translate_errors(URL, "chunks/k", "get"):
        raise exc


def test_the_servers_status_code_and_message_are_kept() -> None:
    # s3fs re-raises a ClientError as an OSError whose cause is the ClientError: dig the answer out.
    cause = _client_error(411, "MissingContentLength", None, "PutObject")
    wrapped = OSError(22, "None")
    wrapped.__cause__ = cause
    with pytest.raises(StoreUnavailableError) as info, translate_errors(URL, "chunks/k", "put"):
        raise wrapped
    err = info.value
    assert (err.status, err.code, err.server_message) == (411, "MissingContentLength", None)
    assert (err.operation, err.key, err.url) == ("put", "chunks/k", URL)
    assert str(err) == "s3://bucket/kv: put 'chunks/k': HTTP 411 MissingContentLength: (no message)"
    assert err.__cause__ is wrapped

    slow = _translated(_client_error(503, "SlowDown", "Please reduce your request rate."))
    assert slow is not None
    assert "HTTP 503 SlowDown: Please reduce your request rate." in str(slow)


def test_errors_of_the_tree_pass_through_and_gain_missing_context() -> None:
    inner = ObjectNotFoundError("no object")
    with pytest.raises(ObjectNotFoundError) as info, translate_errors(URL, "records/r", "get"):
        raise inner
    assert info.value is inner
    assert (inner.url, inner.operation, inner.key) == (URL, "get", "records/r")
    known = StoreUnavailableError("x", operation="head", key="a")
    with pytest.raises(StoreUnavailableError), translate_errors(URL, "b", "get"):
        raise known
    assert (known.operation, known.key, known.url) == ("head", "a", URL)  # what the raiser knew stays


def test_storage_errors_pickle_with_their_context() -> None:
    err = StoreUnavailableError("boom", url=URL, operation="get", key="k", status=503, code="SlowDown")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.status, back.code, back.key) == (type(err), "boom", 503, "SlowDown", "k")


# ---------------------------------------------------------------------- through real backends


async def test_local_errors_carry_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(StoreUnavailableError) as info:
        await LocalObjectStore(blocker).put("k", b"x")
    assert info.value.key == "k"
    assert isinstance(info.value.__cause__, OSError)


async def test_a_bug_below_the_boundary_is_not_a_cache_miss(
    make_spec: Callable[..., Any], make_kv: Callable[..., Any]
) -> None:
    """A bug in the backend call must reach the caller: not retried, not counted as a miss by fail_open."""
    spec = make_spec()
    tokens = list(range(32))
    url = "memory://kvtest-errors-bug/kv"
    async with kvstore.open(url, chunk_tokens=16) as store:
        await store.save_prefix(spec, tokens, make_kv(spec, len(tokens)))
        backend = await open_object_store(url)
        fs = backend.fs  # type: ignore[attr-defined]
        paths: list[str] = []

        def buggy_cat_file(path: str, *args: Any, **kwargs: Any) -> bytes:
            paths.append(path)
            raise AttributeError("'NoneType' object has no attribute 'read'")

        original = fs.cat_file
        fs.cat_file = buggy_cat_file
        try:
            with pytest.raises(AttributeError):
                await store.load_prefix(spec, tokens)
        finally:
            fs.cat_file = original
        assert paths
        assert len(set(paths)) == len(paths)  # none retried
        assert store.stats().read_errors == 0  # not a counted miss
        assert (await store.load_prefix(spec, tokens)).num_tokens == len(tokens)
    await asyncio.to_thread(fs.rm, "/kvtest-errors-bug", recursive=True)
