"""Bulk S3 operations with aioboto3 against the moto server: paginated listing, batched deletes, per-key errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import kvstore
from kvstore.storage import open_object_store
from kvstore.storage.s3_batch import S3BatchClient

pytestmark = pytest.mark.s3


async def test_lists_across_pages_and_deletes_in_batches_of_1000(s3_store_url: Any) -> None:
    url, options = s3_store_url
    backend = await open_object_store(url, options)
    keys = [f"chunks/x/{i:05d}" for i in range(2345)]
    limit = asyncio.Semaphore(64)

    async def put(key: str) -> None:
        async with limit:
            await backend.put(key, b"v")

    await asyncio.gather(*(put(k) for k in keys))
    await backend.put("models/keep.msgpack", b"m")
    async with S3BatchClient(url, options, max_in_flight=3) as client:
        listed = [m async for m in client.list_objects("chunks/")]
        assert [m.key for m in listed] == keys
        assert all(m.size == 1 and m.mtime for m in listed)
        calls: list[int] = []
        original = client._delete_batch

        async def spy(batch: Any) -> Any:
            calls.append(len(batch))
            return await original(batch)

        client._delete_batch = spy  # type: ignore[method-assign]
        assert await client.delete_objects(keys) == []
        assert sorted(calls) == [345, 1000, 1000]
        assert [m async for m in client.list_objects("chunks/")] == []
        assert [m.key async for m in client.list_objects("")] == ["models/keep.msgpack"]
    await backend.close()


async def test_per_key_errors_are_reported(s3_store_url: Any) -> None:
    url, options = s3_store_url
    async with S3BatchClient(url, options) as client:

        async def refuse(**kwargs: Any) -> Any:
            objs = kwargs["Delete"]["Objects"]
            return {"Errors": [{"Key": o["Key"], "Code": "AccessDenied", "Message": "no"} for o in objs[:2]]}

        client._client.delete_objects = refuse
        failures = await client.delete_objects(["a", "b", "c"])
        assert [(f.key, f.error) for f in failures] == [("a", "AccessDenied: no"), ("b", "AccessDenied: no")]


async def test_the_bulk_client_shares_the_stores_parsed_service_models(s3_store_url: Any) -> None:
    """A GC run in a long-lived process must not parse botocore's S3 model again on the event loop."""
    url, options = s3_store_url
    backend = await open_object_store(url, options)
    try:
        await backend.put("chunks/x/1", b"v")
        model = backend.fs.s3.meta.service_model._service_description  # type: ignore[attr-defined]
        async with S3BatchClient(url, options) as client:
            assert client._client.meta.service_model._service_description is model  # parsed once, shared
            assert [m.key async for m in client.list_objects("chunks/")] == ["chunks/x/1"]
    finally:
        await backend.close()


async def test_unreachable_endpoint_is_a_store_error() -> None:
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    async with S3BatchClient("s3://bucket/kv", options) as client:
        with pytest.raises(kvstore.StoreUnavailableError):
            [m async for m in client.list_objects("chunks/")]


def test_client_settings_come_from_storage_options() -> None:
    client = S3BatchClient(
        "s3://bucket/some/root/",
        {"endpoint_url": "http://e", "key": "k", "secret": "s", "client_kwargs": {"region_name": "eu-west-1"}},
    )
    assert (client.bucket, client.root) == ("bucket", "some/root/")
    session, args = client._client_args()
    assert session == {"aws_access_key_id": "k", "aws_secret_access_key": "s"}
    assert args == {"endpoint_url": "http://e", "region_name": "eu-west-1", "verify": False}  # no TLS: no context
    with pytest.raises(kvstore.InvalidInputError):
        S3BatchClient("memory://x")
