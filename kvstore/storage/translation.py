"""Backend exceptions -> kvstore's tree, at the storage boundary: I/O and service errors only.

What is translated: OSError (connection resets, timeouts, TLS, files), botocore's
errors (ClientError: the server answered with an error; BotoCoreError: no usable
answer), aiohttp's client errors, http.client's protocol errors and awscrt's
errors (S3ResponseError: an answer; the rest: sockets, TLS, DNS). What is not:
everything else, above all TypeError, AttributeError and the like from a bug,
which must reach the caller as itself rather than as a retriable "store
unavailable" that a fail-open load would count as a miss.

For HTTP backends the server's status, error code and message are dug out of
the exception chain (s3fs re-raises a botocore ClientError as an OSError, with
the ClientError as its cause) and put in the message and the attributes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from xml.etree import ElementTree

from kvstore.errors import (
    KVStoreError,
    ObjectNotFoundError,
    StorageError,
    StorePermissionError,
    StoreUnavailableError,
)

__all__ = ["HTTPAnswer", "http_answer", "is_io_error", "translate_error", "translate_errors"]

# (module, class names) of the I/O and service errors of optional libraries. A module that
# is not imported yet cannot have raised anything, so it is looked up, never imported.
_IO_ERRORS = (
    ("botocore.exceptions", ("BotoCoreError", "ClientError")),
    ("aiohttp", ("ClientError",)),
    ("http.client", ("HTTPException",)),
    ("awscrt.exceptions", ("AwsCrtError",)),
)
# botocore errors that mean "our request was malformed" (a bug or a bad option), not an I/O failure.
_NOT_IO = (("botocore.exceptions", ("ParamValidationError",)),)
# botocore errors that no retry can fix: the credentials are missing or unusable.
_NO_CREDENTIALS = (("botocore.exceptions", ("NoCredentialsError", "PartialCredentialsError")),)
# awscrt's errors for answers it classifies itself (for its retries) and reports without status or body.
_CRT_ANSWERS = {
    "AWS_ERROR_S3_SLOW_DOWN": (503, "SlowDown"),
    "AWS_ERROR_S3_INTERNAL_ERROR": (500, "InternalError"),
    "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED": (403, "RequestTimeTooSkewed"),
}
_MAX_ERROR_BODY = 64 << 10
"""S3 error documents are a few hundred bytes; a longer body is not parsed."""
_DENIED_CODES = frozenset(
    {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
)


@dataclass(frozen=True, slots=True)
class HTTPAnswer:
    """What an HTTP server answered to a failed request (each part None when it did not say)."""

    status: int | None
    code: str | None
    message: str | None


def _classes(table: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module_name, names in table:
        module = sys.modules.get(module_name)
        if module is not None:
            found.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(found)


def is_io_error(exc: BaseException) -> bool:
    """True for errors of I/O and of the service behind it; False for everything else (bugs)."""
    if isinstance(exc, _classes(_NOT_IO)):
        return False
    return isinstance(exc, (OSError, *_classes(_IO_ERRORS)))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def http_answer(exc: BaseException) -> HTTPAnswer | None:
    """The server's answer behind ``exc`` (a botocore ClientError or aiohttp response error in its chain)."""
    client_error = _classes((("botocore.exceptions", ("ClientError",)),))
    response_error = _classes((("aiohttp", ("ClientResponseError",)),))
    crt_response = _classes((("awscrt.s3", ("S3ResponseError",)),))
    crt_error = _classes((("awscrt.exceptions", ("AwsCrtError",)),))
    for link in _chain(exc):
        if crt_response and isinstance(link, crt_response) and getattr(link, "status_code", None):
            return _xml_answer(link.status_code, link.body)  # type: ignore[attr-defined]
        if crt_error and isinstance(link, crt_error) and getattr(link, "name", None) in _CRT_ANSWERS:
            crt_status, crt_code = _CRT_ANSWERS[link.name]  # type: ignore[attr-defined]
            return HTTPAnswer(crt_status, crt_code, getattr(link, "message", None) or None)
        if client_error and isinstance(link, client_error):
            response = getattr(link, "response", None) or {}
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if status is None and str(error.get("Code", "")).isdigit():
                status = int(error["Code"])  # a HEAD's error has no body: botocore uses the status as code
            return HTTPAnswer(status, error.get("Code") or None, error.get("Message") or None)
        if response_error and isinstance(link, response_error):
            return HTTPAnswer(getattr(link, "status", None), None, getattr(link, "message", None) or None)
    return None


def _xml_answer(status: int | None, body: bytes | None) -> HTTPAnswer:
    """An S3 error answer from its status and XML body (``<Error><Code>..</Code><Message>..</Message>``)."""
    code = message = None
    if body and len(body) <= _MAX_ERROR_BODY:
        with contextlib.suppress(ElementTree.ParseError):
            root = ElementTree.fromstring(body)
            code, message = root.findtext("Code"), root.findtext("Message")
    if code is None and status is not None:
        code = str(status)  # a HEAD's error has no body: botocore uses the status as code too
    return HTTPAnswer(status, code or None, message or None)


def translate_error(exc: BaseException, *, url: str, key: str, operation: str | None = None) -> StorageError | None:
    """kvstore's error for a backend exception, or None when ``exc`` is no I/O or service error (a bug)."""
    if not is_io_error(exc):
        return None
    answer = http_answer(exc) or HTTPAnswer(None, None, None)
    where = f"{url}: {operation} {key!r}" if operation else f"{url}: {key!r}"
    if answer.status is not None or answer.code is not None:
        what = " ".join(str(part) for part in (answer.status, answer.code) if part is not None)
        detail = f"HTTP {what}: {answer.message or '(no message)'}"
    else:
        detail = f"{type(exc).__name__}: {exc}"

    def error(cls: type[StorageError], message: str) -> StorageError:
        return cls(
            message, url=url, operation=operation, key=key,
            status=answer.status, code=answer.code, server_message=answer.message,
        )  # fmt: skip

    if isinstance(exc, FileNotFoundError) or answer.code in ("NoSuchKey", "404"):
        return error(ObjectNotFoundError, f"{where}: no such object")
    if (
        answer.status == 403
        or answer.code in _DENIED_CODES
        or isinstance(exc, (PermissionError, *_classes(_NO_CREDENTIALS)))
    ):
        return error(StorePermissionError, f"{where}: access denied: {detail}")
    return error(StoreUnavailableError, f"{where}: {detail}")


@contextlib.contextmanager
def translate_errors(url: str, key: str, operation: str | None = None) -> Iterator[None]:
    """Translate I/O and service errors raised in the block into kvstore's tree (the original is the cause).

    Errors of kvstore's tree pass through (a ``StorageError`` gains the context
    it lacks); any other exception propagates unchanged.
    """
    try:
        yield
    except StorageError as exc:
        exc.add_context(url=url, operation=operation, key=key)
        raise
    except KVStoreError:
        raise
    except Exception as exc:
        translated = translate_error(exc, url=url, key=key, operation=operation)
        if translated is None:
            raise
        raise translated from exc
