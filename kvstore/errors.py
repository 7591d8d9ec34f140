"""kvstore's exception tree: every error the library raises is one of these.

    KVStoreError
    ├── InvalidInputError        bad arguments; raised before anything is written (also a ValueError)
    ├── StoreConfigError         the store was created with other settings (e.g. chunk_tokens)
    ├── FormatVersionError       the store or a record uses a format version this library cannot read
    ├── IntegrityError           stored data is damaged: checksum, size, structure or metadata
    ├── ObjectNotFoundError      the storage boundary found no object at a key (also a KeyError)
    ├── ModelRetiredError        a save under a model version that was retired (``store.retire``)
    ├── WriteBackError           background saves (``save_prefix(wait=False)``) failed; from flush()/close()
    └── StoreUnavailableError    the backend cannot be reached or refused the request
        ├── StorePermissionError the backend denied access to a key
        └── CircuitOpenError     skipped at once: the backend failed repeatedly and is cooling down

Backend exceptions (OSError, botocore errors, ...) are translated at the storage
boundary with ``raise ... from exc`` so callers only ever catch this tree.
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


class ObjectNotFoundError(KVStoreError, KeyError):
    """No object exists at the requested key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "object not found"


class ModelRetiredError(KVStoreError):
    """The model version was retired: its chunks are garbage and no new ones may be saved."""


class StoreUnavailableError(KVStoreError):
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
