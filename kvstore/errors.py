"""kvstore's exception tree: every error the library raises is one of these.

    KVStoreError
    ├── InvalidInputError                 bad arguments; raised before anything is written (also a ValueError)
    ├── StoreConfigError                  the store was created with other settings (e.g. chunk_tokens)
    ├── FormatVersionError                the store or a record uses a format version this library cannot read
    ├── IntegrityError                    stored data is damaged: checksum, size, structure or metadata
    ├── ModelRetiredError                 a save under a model version that was retired (``store.retire``)
    ├── WriteBackError                    background saves (``save_prefix(wait=False)``) failed; from flush()/close()
    └── StorageError                      a storage request failed (attributes: url, operation, key, status, code)
        ├── ObjectNotFoundError           no object at the key (also a KeyError)
        └── StoreUnavailableError         the backend cannot be reached or refused the request
            ├── StorePermissionError      the backend denied access (credentials, policy)
            └── CircuitOpenError          skipped at once: the backend failed repeatedly and is cooling down

Backend I/O and service errors (OSError, timeouts, botocore and aiohttp errors) are
translated at the storage boundary with ``raise ... from exc`` so callers only ever
catch this tree; a ``StorageError`` says which request failed and, for HTTP
backends, the server's status, error code and message. Anything else (a
``TypeError`` from a bug) is not translated: it propagates as itself.
"""

from __future__ import annotations

__all__ = [
    "CircuitOpenError",
    "FormatVersionError",
    "IntegrityError",
    "InvalidInputError",
    "KVStoreError",
    "ModelRetiredError",
    "ObjectNotFoundError",
    "StorageError",
    "StoreConfigError",
    "StorePermissionError",
    "StoreUnavailableError",
    "WriteBackError",
]


class KVStoreError(Exception):
    """Base class of every exception raised by kvstore."""


class InvalidInputError(KVStoreError, ValueError):
    """An argument is malformed: wrong shape, dtype, layer count, token values, ..."""


class StoreConfigError(KVStoreError):
    """The store at this URL was created with settings that conflict with the ones given."""


class FormatVersionError(KVStoreError):
    """Data was written in an on-store format version this library does not understand."""


class IntegrityError(KVStoreError):
    """Stored data failed verification (checksum, size, structure or metadata)."""


class ModelRetiredError(KVStoreError):
    """The model version was retired: its chunks are garbage and no new ones may be saved."""


class StorageError(KVStoreError):
    """A request at the storage boundary failed; the attributes say which, and what the backend answered.

    ``url`` is the store, ``operation`` the request (``get``, ``put``, ``head``,
    ``list``, ``delete``, ...), ``key`` the object (relative to the store); for
    HTTP backends ``status`` is the HTTP status and ``code`` / ``server_message``
    the server's error code and message. Any of them is None when unknown.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        operation: str | None = None,
        key: str | None = None,
        status: int | None = None,
        code: str | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.operation = operation
        self.key = key
        self.status = status
        self.code = code
        self.server_message = server_message

    def add_context(self, *, url: str | None, operation: str | None, key: str | None) -> None:
        """Fill in the request's context where the raiser did not know it (an inner layer raised it)."""
        self.url = self.url if self.url is not None else url
        self.operation = self.operation if self.operation is not None else operation
        self.key = self.key if self.key is not None else key


class ObjectNotFoundError(StorageError, KeyError):
    """No object exists at the requested key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "object not found"


class StoreUnavailableError(StorageError):
    """The storage backend could not be reached or failed the request."""


class StorePermissionError(StoreUnavailableError):
    """The storage backend denied access (credentials, bucket policy, read-only path)."""


class CircuitOpenError(StoreUnavailableError):
    """Not sent: the backend failed repeatedly and is skipped until its cool-down ends."""


class WriteBackError(KVStoreError):
    """Background saves failed; ``errors`` holds each failure (the first is also the cause)."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(f"{len(errors)} background save(s) failed; the first: {errors[0]!r}")
        self.errors = errors
