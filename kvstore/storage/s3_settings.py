"""botocore settings for every S3 client kvstore builds (s3fs for objects, aioboto3 for the GC's bulk calls).

Three defaults differ from botocore's, each unless the user sets it (in
``storage_options["config_kwargs"]`` or the matching AWS environment variable):

- **Checksums only where an operation requires one** (``request_checksum_calculation``
  and ``response_checksum_validation`` = ``"when_required"``). Since botocore 1.36
  every PutObject is sent as an aws-chunked upload with a trailing CRC32 and, over
  HTTPS, no Content-Length; S3-compatible servers that predate it (Ceph RGW 16,
  older MinIO, ECS) refuse it (411 MissingContentLength, 400 XAmzContentSHA256Mismatch).
  kvstore verifies every object it reads with its own crc32c checksums.
- **No retries below kvstore's** (``retries={"mode": "standard", "total_max_attempts": 1}``
  and s3fs's ``retries = 1``): kvstore's RetryPolicy is the one retry layer, so one
  failing request is ``RetryPolicy.attempts`` requests, not attempts x s3fs's 5 x
  botocore's 3, and its deadlines hold. ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` are
  ignored for that reason; ``config_kwargs["retries"]`` still wins. The GC's bulk client, which no RetryPolicy
  wraps, keeps botocore's standard retries as its one layer (``attempts``).
- **Unsigned bodies over HTTPS** (``s3={"payload_signing_enabled": False}``, only when the
  endpoint is HTTPS, as AWS's own is). Without a checksum header botocore SHA-256-hashes every
  body into the signature on the event loop's thread: a save to Ceph RGW over HTTPS measured
  9.4 client CPU s per GB signed, 6.7 unsigned (0.064 and 0.080 GB/s). TLS already
  protects the bytes in transit and kvstore checks every layer's crc32c when it reads. Over
  plain HTTP bodies stay signed: there the signature is the only thing that stops a
  man in the middle from changing what is stored.

Every s3fs client kvstore opens, and the GC's aioboto3 bulk client, also share **one botocore data
loader per process** (per ``data_path``): botocore otherwise parses the S3 service model's JSON again
for each new session, 280 ms on the event loop's thread at every ``kvstore.open`` of an S3 store
(cProfile: 0.28 of a 0.40 s open) and at every GC run (a bulk client's open and first LIST: 80-390
ms, 22-34 ms shared); the parsed models are read-only AWS data, the same for every store.

One more applies to plain-HTTP endpoints only: **no SSL context** (``client_kwargs["verify"] = False``
unless set). There is no TLS to verify, but aiobotocore still builds a context and loads the CA
bundle on a client's first request, on the event loop's thread: 19-45 ms before a new store's
first HEAD (measured on moto), which every request then queued behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["S3FS_RETRIES", "botocore_config_kwargs", "client_kwargs", "session_with_shared_loader", "uses_https"]

S3FS_RETRIES = 1
"""s3fs's own tries per request (its default is 5): one, since kvstore retries."""

_LOADERS: dict[str | None, Any] = {}
"""botocore data loaders by ``data_path``: caches of parsed AWS model files, shared by every session made here."""

_CHECKSUM_SETTINGS = {
    "request_checksum_calculation": "AWS_REQUEST_CHECKSUM_CALCULATION",
    "response_checksum_validation": "AWS_RESPONSE_CHECKSUM_VALIDATION",
}


def botocore_config_kwargs(user: Mapping[str, Any] | None, *, https: bool, attempts: int = 1) -> dict[str, Any]:
    """``botocore.config.Config`` keyword arguments: the user's, plus kvstore's defaults for what they left out.

    ``https``: the client talks TLS (``uses_https``); ``attempts`` is botocore's
    total tries per request (1: no retries).
    """
    config = dict(user or {})
    s3 = dict(config.get("s3") or {})
    if https and "payload_signing_enabled" not in s3:
        config["s3"] = {**s3, "payload_signing_enabled": False}
    for name, env in _CHECKSUM_SETTINGS.items():
        if name not in config and not os.environ.get(env):
            config[name] = "when_required"
    if "retries" not in config:
        config["retries"] = {"mode": "standard", "total_max_attempts": attempts}
    return config


def uses_https(storage_options: Mapping[str, Any]) -> bool:
    """Whether an S3 client made from these s3fs-style options talks TLS (AWS's default endpoint does)."""
    client_kwargs = storage_options.get("client_kwargs") or {}
    endpoint = storage_options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if endpoint:
        return str(endpoint).lower().startswith("https://")
    return bool(storage_options.get("use_ssl", client_kwargs.get("use_ssl", True)))


def client_kwargs(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """s3fs's ``client_kwargs``: the user's, plus ``verify=False`` where nothing talks TLS (module docstring)."""
    kwargs = dict(storage_options.get("client_kwargs") or {})
    if not uses_https(storage_options):
        kwargs.setdefault("verify", False)
    return kwargs


def session_with_shared_loader(session_kwargs: Mapping[str, Any]) -> Any:
    """An aiobotocore session (made with s3fs's ``session_kwargs``) whose data loader is this process's shared one."""
    from aiobotocore.session import AioSession
    from botocore.loaders import create_loader

    session = AioSession(**session_kwargs)
    path = session.get_config_variable("data_path")
    loader = _LOADERS.get(path)
    if loader is None:
        loader = _LOADERS[path] = create_loader(path)
    session.register_component("data_loader", loader)
    return session
