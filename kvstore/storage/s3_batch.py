"""Bulk listing and deletion on S3 with aioboto3: ListObjectsV2 pages and DeleteObjects batches.

s3fs deletes and lists through the same calls, but hides per-key delete errors
and materializes whole listings; the GC needs a stream of objects and a report
of every key S3 refused. Credentials and endpoint come from the same
``storage_options`` as s3fs (``key``, ``secret``, ``token``, ``endpoint_url``,
``client_kwargs.region_name``, ``config_kwargs`` with the defaults of
``kvstore.storage.s3_settings``), then from the environment as aws tools do
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, profiles).
aioboto3 comes with the ``s3`` extra and is imported on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kvstore._tasks import task_group
from kvstore.errors import InvalidInputError, StorageError, StorePermissionError
from kvstore.storage.base import ObjectMeta
from kvstore.storage.resilient import RetryPolicy
from kvstore.storage.s3_settings import botocore_config_kwargs, session_with_shared_loader, uses_https
from kvstore.storage.s3_settings import client_kwargs as s3_client_kwargs
from kvstore.storage.translation import translate_error, translate_errors

__all__ = ["MAX_DELETE_BATCH", "DeleteFailure", "S3BatchClient"]

MAX_DELETE_BATCH = 1000
"""S3's limit of keys per DeleteObjects request."""


@dataclass(frozen=True, slots=True)
class DeleteFailure:
    """A key the backend did not delete, and why (S3's error code and message)."""

    key: str
    error: str


def _split_url(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("s3", "s3a"):
        raise InvalidInputError(f"not an s3:// URL: {url!r}")
    bucket, _, root = rest.partition("/")
    if not bucket:
        raise InvalidInputError(f"no bucket in {url!r}")
    root = root.strip("/")
    return bucket, f"{root}/" if root else ""


def _meta(obj: dict[str, Any], cut: int) -> ObjectMeta:
    modified = obj.get("LastModified")
    return ObjectMeta(obj["Key"][cut:], int(obj.get("Size", 0)), modified.timestamp() if modified else None)


class S3BatchClient:
    """One aioboto3 S3 client for a store root; use as ``async with S3BatchClient(url, options)``."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        max_in_flight: int = 8,
        fan_out: int = 16,
        split_min: int = 256,
    ) -> None:
        self.url = url
        self.bucket, self.root = _split_url(url)
        self.max_in_flight = max_in_flight
        self.fan_out = fan_out
        """How many prefixes a fan-out listing (``kvstore.gc.bulk.plan_partitions``) lists at once."""
        self.split_min = split_min
        """Objects in a prefix's first sub-prefix from which ``plan_partitions`` splits it."""
        self._options = dict(storage_options or {})
        self._client: Any = None
        self._client_cm: Any = None

    def _client_args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        o = self._options
        client_kwargs = s3_client_kwargs(o)
        session_args = {
            name: value
            for name, value in (
                ("aws_access_key_id", o.get("key")),
                ("aws_secret_access_key", o.get("secret")),
                ("aws_session_token", o.get("token")),
                ("profile_name", o.get("profile")),
            )
            if value is not None
        }
        client_args: dict[str, Any] = {}
        endpoint = o.get("endpoint_url") or client_kwargs.pop("endpoint_url", None)
        if endpoint:
            client_args["endpoint_url"] = endpoint
        region = client_kwargs.pop("region_name", None)
        if region:
            client_args["region_name"] = region
        client_args.update(client_kwargs)
        return session_args, client_args

    async def __aenter__(self) -> S3BatchClient:
        try:
            import aioboto3
            from botocore.config import Config
        except ImportError as exc:
            raise InvalidInputError(
                f"bulk S3 operations need aioboto3 ({exc}); install the 's3' extra: pip install 'kvstore[s3]'"
            ) from exc
        session_args, client_args = self._client_args()
        # No RetryPolicy wraps these calls: botocore's standard retries are their one retry layer.
        settings = botocore_config_kwargs(
            self._options.get("config_kwargs"), https=uses_https(self._options), attempts=RetryPolicy().attempts
        )
        settings.setdefault("max_pool_connections", max(10, 2 * self.max_in_flight + self.fan_out))
        config = Config(**settings)
        with translate_errors(self.url, "", "open"):
            # botocore's parsed service models come from the loader every kvstore S3 client shares (s3_settings).
            shared = session_with_shared_loader({})
            self._client_cm = aioboto3.Session(botocore_session=shared, **session_args).client(
                "s3", config=config, **client_args
            )
            self._client = await self._client_cm.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client_cm is not None:
            cm, self._client_cm, self._client = self._client_cm, None, None
            await cm.__aexit__(exc_type, exc, tb)

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectMeta]:
        """Stream objects under ``prefix`` (relative to the store root), 1000 per ListObjectsV2 page."""
        full = self.root + prefix
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": 1000}
        cut = len(self.root)
        while True:
            with translate_errors(self.url, prefix, "list"):
                page = await self._client.list_objects_v2(**kwargs)
            for obj in page.get("Contents", ()):
                yield _meta(obj, cut)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    async def list_level(self, prefix: str) -> tuple[list[str], list[ObjectMeta]]:
        """One level under ``prefix`` (a delimiter listing): its sub-prefixes and the objects directly in it."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.root + prefix,
            "Delimiter": "/",
            "MaxKeys": 1000,
        }
        cut = len(self.root)
        subs: list[str] = []
        objects: list[ObjectMeta] = []
        while True:
            with translate_errors(self.url, prefix, "list"):
                page = await self._client.list_objects_v2(**kwargs)
            subs.extend(p["Prefix"][cut:] for p in page.get("CommonPrefixes", ()))
            objects.extend(_meta(obj, cut) for obj in page.get("Contents", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return subs, objects
            kwargs["ContinuationToken"] = token

    async def delete_objects(self, keys: Sequence[str]) -> list[DeleteFailure]:
        """Delete keys in DeleteObjects batches of up to 1000, ``max_in_flight`` at a time.

        Returns every key S3 reported as not deleted; a batch whose request failed
        as a whole reports each of its keys with that error.
        """
        batches = [keys[i : i + MAX_DELETE_BATCH] for i in range(0, len(keys), MAX_DELETE_BATCH)]
        limit = asyncio.Semaphore(self.max_in_flight)
        failures: list[DeleteFailure] = []

        async def one(batch: Sequence[str]) -> None:
            async with limit:
                failures.extend(await self._delete_batch(batch))

        async with task_group() as tg:
            for batch in batches:
                tg.create_task(one(batch))
        return failures

    async def _delete_batch(self, keys: Sequence[str]) -> list[DeleteFailure]:
        request = {"Objects": [{"Key": self.root + k} for k in keys], "Quiet": True}
        try:
            resp = await self._client.delete_objects(Bucket=self.bucket, Delete=request)
        except Exception as exc:
            error = self._translated(exc, keys[0])
            if isinstance(error, StorePermissionError):
                # Ceph RGW (16) authorizes DeleteObjects for the bucket as a whole: credentials confined to a
                # prefix by a bucket policy are refused the batch, though each of their keys may be deleted.
                return await self._delete_one_by_one(keys)
            return [DeleteFailure(k, str(error)) for k in keys]
        cut = len(self.root)
        return [
            DeleteFailure(e.get("Key", "")[cut:], f"{e.get('Code', 'Error')}: {e.get('Message', '')}".strip())
            for e in resp.get("Errors", ())
        ]

    async def _delete_one_by_one(self, keys: Sequence[str]) -> list[DeleteFailure]:
        """DeleteObject per key, a few at a time: each key is authorized (and reported) on its own."""
        limit = asyncio.Semaphore(self.max_in_flight)
        failures: list[DeleteFailure] = []

        async def one(key: str) -> None:
            async with limit:
                try:
                    await self._client.delete_object(Bucket=self.bucket, Key=self.root + key)
                except Exception as exc:
                    error = self._translated(exc, key)
                    failures.append(DeleteFailure(key, f"{error.code or type(exc).__name__}: {error}"))

        async with task_group() as tg:
            for key in keys:
                tg.create_task(one(key))
        return sorted(failures, key=lambda f: f.key)

    def _translated(self, exc: Exception, key: str) -> StorageError:
        """kvstore's error for a failed delete request; anything but an I/O or service error propagates."""
        error = translate_error(exc, url=self.url, key=key, operation="delete")
        if error is None:
            raise exc
        return error
