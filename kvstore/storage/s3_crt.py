"""S3 requests through awscrt (AWS's C runtime): GET, ranged GET, PUT and HEAD, the requests a load or save makes.

Why: botocore builds and signs every request in Python on the event loop's
thread; awscrt does it in C on threads of its own (LMCache's S3 connector uses
it). ``benchmarks/bench_s3_clients.py`` on moto: PUTs at 1.47x botocore's rate
with 0.35x the client CPU, small PUTs at 0.46x the CPU; 64 HEADs (a lookup of
a 16K-token prompt) 41 ms of client CPU against 140. Listings and deletes (the
GC's, and one listing when a chain stops short) stay on s3fs/botocore, so one
set of credentials, endpoint and region serves both: they are read from the
s3fs client after it is set up.

Opt in with ``storage_options={"transport": "crt"}`` (the ``crt`` extra:
``pip install 'kvstore[crt]'``). What is the same as with botocore: one request
per GET and PUT (sent as they are: no multipart, no ranged splitting), create-only PUTs
with ``If-None-Match: *`` (412: the object is there), no flexible checksums,
no retries below kvstore's RetryPolicy, bodies signed over plain HTTP and
unsigned over HTTPS (``config_kwargs={"s3": {"payload_signing_enabled": ...}}``
wins), TLS verified against the system's or ``client_kwargs["verify"]``'s CA
bundle (or ``AWS_CA_BUNDLE``). s3fs options that change what a data request
sends (``s3_additional_kwargs``: encryption, ACLs; ``requester_pays``; ``anon``;
``version_aware``) are refused rather than silently dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import io
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

from kvstore._workers import in_worker
from kvstore.errors import InvalidInputError
from kvstore.storage.base import ObjectMeta
from kvstore.storage.fsspec_store import S3ObjectStore
from kvstore.storage.translation import http_answer, translate_errors

__all__ = ["CrtS3ObjectStore", "CrtSettings", "crt_settings"]

_UNSUPPORTED = ("s3_additional_kwargs", "requester_pays", "anon", "version_aware")
_OPERATIONS = {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject"}
_CREDENTIALS_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class CrtSettings:
    """Where and how awscrt's requests go, as the s3fs client of the same store resolved it."""

    endpoint: str
    """``scheme://host[:port]``."""
    region: str
    path_style: bool
    """``/bucket/key`` on the endpoint's host; else ``bucket.host`` (virtual-hosted, AWS's default)."""
    sign_bodies: bool
    """The body's SHA-256 in the signature (plain HTTP); else ``UNSIGNED-PAYLOAD`` (TLS protects it)."""
    verify: bool | str
    """TLS: verify against the system's CAs (True), not at all (False), or a CA bundle file."""

    @property
    def https(self) -> bool:
        return self.endpoint.lower().startswith("https://")


def crt_settings(s3_client: Any, options: dict[str, Any]) -> CrtSettings:
    """The settings of a store's awscrt client, from its set-up s3fs client (``fs.s3``) and its options."""
    refused = sorted(name for name in _UNSUPPORTED if options.get(name))
    if refused:
        raise InvalidInputError(f"the crt transport does not support the storage options {refused}: drop them")
    endpoint = str(s3_client.meta.endpoint_url).rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(f"the crt transport needs an http(s) endpoint, not {endpoint!r}")
    config = options.get("config_kwargs") or {}
    s3_config = config.get("s3") or {}
    style = s3_config.get("addressing_style", "auto")
    path_style = style == "path" or (style == "auto" and not parts.hostname.endswith("amazonaws.com"))  # type: ignore[union-attr]
    https = parts.scheme == "https"
    signing = s3_config.get("payload_signing_enabled")
    client_kwargs = options.get("client_kwargs") or {}
    verify = client_kwargs.get("verify", options.get("verify"))
    if verify is None:
        verify = os.environ.get("AWS_CA_BUNDLE") or True
    return CrtSettings(
        endpoint=f"{parts.scheme}://{parts.netloc}",
        region=str(s3_client.meta.region_name or "us-east-1"),
        path_style=path_style,
        sign_bodies=(not https) if signing is None else bool(signing),
        verify=verify if isinstance(verify, str) else bool(verify),
    )


class _Guard:
    """Caller memory that crt's threads may touch only until the awaiting call gives up (cancelled, timed out)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True


class _PartsStream(io.RawIOBase):
    """The concatenation of ``parts`` as a readable, seekable stream (crt re-reads it to sign the body)."""

    def __init__(self, parts: Sequence[memoryview], guard: _Guard) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self.size = sum(len(p) for p in self._parts)
        self._pos = 0
        self._guard = guard

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = min(max(0, base + offset), self.size)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        with self._guard.lock:
            if self._guard.closed:
                raise OSError("the upload was cancelled")
            filled, at = 0, 0
            for part in self._parts:
                end = at + len(part)
                if self._pos < end and filled < len(out):
                    start = self._pos - at
                    n = min(len(part) - start, len(out) - filled)
                    out[filled : filled + n] = part[start : start + n]
                    filled += n
                    self._pos += n
                at = end
            return filled


class _Credentials:
    """The s3fs client's credentials for crt's signer: frozen once, or refreshed through botocore when due."""

    def __init__(self, credentials: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._credentials = credentials
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made in the loop's thread (start_crt)
        self._frozen: Any = None
        self._lock = threading.Lock()

    async def freeze(self) -> None:
        self._frozen = await self._credentials.get_frozen_credentials()

    def __call__(self) -> Any:  # on a crt thread
        from awscrt.auth import AwsCredentials

        with self._lock:
            refresh = getattr(self._credentials, "refresh_needed", None)
            due = refresh is not None and refresh() and threading.get_ident() != self._loop_thread
            if self._frozen is None or due:  # (waiting for the loop on its own thread would never end)
                future = asyncio.run_coroutine_threadsafe(self._credentials.get_frozen_credentials(), self._loop)
                self._frozen = future.result(_CREDENTIALS_TIMEOUT_S)
            f = self._frozen
        return AwsCredentials(f.access_key, f.secret_key, f.token or None)


def _settle(done: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    if not done.done():  # a cancelled call leaves its future done
        done.set_result(error)


def _status(error: BaseException) -> int | None:
    answer = http_answer(error)
    return None if answer is None else answer.status


def _sha256_hex(parts: Sequence[memoryview]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _import_crt() -> Any:
    try:
        s3 = importlib.import_module("awscrt.s3")
    except ImportError as exc:
        raise InvalidInputError(
            f"the crt transport needs awscrt ({exc}); install the 'crt' extra: pip install 'kvstore[crt]'"
        ) from exc
    return s3


class CrtS3ObjectStore(S3ObjectStore):
    """s3fs for listings and deletes; awscrt's S3 client for HEADs and objects' bytes (see the module docstring)."""

    writes_parts = True

    async def start_crt(self, options: dict[str, Any]) -> None:
        """Build the awscrt client from the set-up s3fs client (its endpoint, region and credentials)."""
        s3 = _import_crt()
        from awscrt import auth
        from awscrt import io as crt_io

        self.crt = crt_settings(self.fs.s3, options)
        credentials = getattr(self.fs.s3._request_signer, "_credentials", None)  # what botocore signs with
        if credentials is None:
            raise InvalidInputError(f"{self.url}: no AWS credentials found for the crt transport")
        delegate = _Credentials(credentials, asyncio.get_running_loop())
        with translate_errors(self.url, "", "open"):
            await delegate.freeze()
        provider = auth.AwsCredentialsProvider.new_delegate(delegate)
        signing = s3.create_default_s3_signing_config(region=self.crt.region, credential_provider=provider)
        threads = max(1, min(4, os.cpu_count() or 1))
        group = crt_io.EventLoopGroup(threads)
        bootstrap = crt_io.ClientBootstrap(group, crt_io.DefaultHostResolver(group))
        tls: dict[str, Any] = {"tls_mode": s3.S3RequestTlsMode.DISABLED}
        if self.crt.https:
            tls_options = crt_io.TlsContextOptions()
            if isinstance(self.crt.verify, str):
                tls_options.override_default_trust_store_from_path(None, self.crt.verify)
            else:
                tls_options.verify_peer = self.crt.verify
            connection = crt_io.ClientTlsContext(tls_options).new_connection_options()
            tls = {"tls_mode": s3.S3RequestTlsMode.ENABLED, "tls_connection_options": connection}
        self._s3 = s3
        self._signing = signing
        self._client = s3.S3Client(
            bootstrap=bootstrap,
            region=self.crt.region,
            signing_config=signing,
            retry_config=s3.S3RetryConfig(retry_mode=s3.S3RetryMode.NONE),
            **tls,
        )

    def _target(self, key: str) -> tuple[str, str]:
        """(Host header, request path) of ``key``."""
        bucket, object_key = self._bucket_key(key)
        host = urlsplit(self.crt.endpoint).netloc
        path = quote(object_key, safe="/~")
        if self.crt.path_style:
            return host, f"/{bucket}/{path}"
        return f"{bucket}.{host}", f"/{path}"

    async def _request(
        self,
        method: str,
        key: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: Sequence[memoryview] | None = None,
        on_body: Callable[[bytes, int], None] | None = None,
        on_headers: Callable[[list[tuple[str, str]]], None] | None = None,
    ) -> BaseException | None:
        """Send one request; return its error (None: a 2xx answer). ``on_body(chunk, offset)`` runs on a crt thread,
        as does ``on_headers(headers)`` (of a 2xx answer).

        With ``sign_bodies`` a body's SHA-256 goes into the signature, hashed in a
        worker thread (crt's S3 client signs bodies as ``UNSIGNED-PAYLOAD`` whatever
        its signing settings say).
        """
        from awscrt.http import HttpHeaders, HttpRequest

        s3 = self._s3
        host, path = self._target(key)
        guard = _Guard()
        all_headers = HttpHeaders([("Host", host), *headers])
        stream = None
        signing = self._signing
        if body is not None:
            stream = _PartsStream(body, guard)
            all_headers.add("Content-Length", str(stream.size))
            if self.crt.sign_bodies:
                signing = signing.replace(signed_body_value=await in_worker(_sha256_hex, body))
        loop = asyncio.get_running_loop()
        done: asyncio.Future[BaseException | None] = loop.create_future()
        status: list[int] = [0]

        def headers_in(status_code: int, headers: Any, **_: Any) -> None:
            status[0] = status_code
            if on_headers is not None and 200 <= status_code < 300:
                on_headers(list(headers))

        def body_in(chunk: bytes, offset: int, **_: Any) -> None:
            with guard.lock:
                if not guard.closed and on_body is not None:
                    on_body(chunk, offset)

        def finished(
            error: Any = None, error_body: bytes | None = None, status_code: int | None = None, **_: Any
        ) -> None:
            code = status_code or status[0]
            if error is not None and code >= 300 and not isinstance(error, s3.S3ResponseError):
                # An answer crt reports as a plain AwsCrtError: keep what the server said with it.
                error = s3.S3ResponseError(
                    code=error.code, name=error.name, message=error.message, status_code=code, body=error_body
                )
            loop.call_soon_threadsafe(_settle, done, error)

        # DEFAULT: sent as it is, one request, the body streamed (GET_OBJECT/PUT_OBJECT would split objects
        # into parts and buffer each part in crt's memory pool first).
        request = s3.S3Request(
            client=self._client,
            type=s3.S3RequestType.DEFAULT,
            operation_name=_OPERATIONS[method],
            request=HttpRequest(method, path, all_headers, stream),
            region=self.crt.region,
            on_headers=headers_in,
            on_body=body_in if on_body is not None else None,
            on_done=finished,
            signing_config=signing,
        )
        try:
            return await done
        except BaseException:
            guard.close()  # no more reads from the caller's buffers, no more writes to them
            request.cancel()
            raise

    async def head(self, key: str) -> ObjectMeta | None:
        found: list[list[tuple[str, str]]] = []
        with translate_errors(self.url, key, "head"):
            error = await self._request("HEAD", key, on_headers=found.append)
            if error is not None:
                if _status(error) == 404:
                    return None
                raise error
        fields = {name.lower(): value for name, value in found[0]} if found else {}
        modified = fields.get("last-modified")
        return ObjectMeta(
            key,
            int(fields.get("content-length") or 0),
            parsedate_to_datetime(modified).timestamp() if modified else None,
        )

    async def get(self, key: str) -> bytes:
        return await self._get(key, None, "get")

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return await self._get(key, (start, end), "get_range")

    async def _get(self, key: str, span: tuple[int, int] | None, operation: str) -> bytes:
        pieces: list[tuple[int, bytes]] = []
        headers = [("Range", f"bytes={span[0]}-{span[1] - 1}")] if span is not None else []
        with translate_errors(self.url, key, operation):
            error = await self._request("GET", key, headers=headers, on_body=lambda b, o: pieces.append((o, b)))
            if error is not None:
                if span is not None and _status(error) == 416:
                    return b""  # the range starts at or after the object's end
                raise error
        if len(pieces) == 1:
            return pieces[0][1]
        pieces.sort(key=lambda p: p[0])
        return b"".join(p[1] for p in pieces)

    async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        return await self.put_parts(key, [memoryview(data)], create_only=create_only)

    async def put_parts(self, key: str, parts: Sequence[memoryview], *, create_only: bool = False) -> bool:
        headers = [("If-None-Match", "*")] if create_only else []
        with translate_errors(self.url, key, "put"):
            error = await self._request("PUT", key, headers=headers, body=parts)
            if error is not None:
                if create_only and _status(error) == 412:
                    return False  # If-None-Match: the object is there
                raise error
        return True

    async def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            shutdown = client.shutdown_event
            del client
            await asyncio.to_thread(shutdown.wait, 5.0)
        await super().close()
