"""Storage backends behind one small async interface (``ObjectStore``)."""

from __future__ import annotations

import os
from typing import Any

from kvstore.errors import InvalidInputError
from kvstore.storage.base import ObjectMeta, ObjectStore, translate_errors
from kvstore.storage.local import LocalObjectStore

__all__ = ["LocalObjectStore", "ObjectMeta", "ObjectStore", "open_object_store", "translate_errors"]


async def open_object_store(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> ObjectStore:
    """The backend for a URL: a plain path or ``file://`` is a local directory, anything else goes to fsspec."""
    text = os.fspath(url)
    if not text:
        raise InvalidInputError("store URL is empty")
    if "://" not in text or text.startswith("file://"):
        path = text.removeprefix("file://")
        options = dict(storage_options or {})
        fsync = bool(options.pop("fsync", False))
        if options:
            raise InvalidInputError(f"unknown storage options for a local directory: {sorted(options)}")
        return LocalObjectStore(path, fsync=fsync)
    from kvstore.storage.fsspec_store import open_fsspec

    try:
        return await open_fsspec(text, storage_options)
    except ImportError as exc:
        hint = " (install the 's3' extra: pip install 'kvstore[s3]')" if text.startswith("s3") else ""
        raise InvalidInputError(f"cannot open {text!r}: {exc}{hint}") from exc
    except ValueError as exc:
        raise InvalidInputError(f"cannot open {text!r}: {exc}") from exc
