"""The public API is deliberate: guard its names and keep optional parts unimported."""

from __future__ import annotations

import subprocess
import sys

import kvstore

EXPECTED = {
    "CircuitOpenError",
    "RetryPolicy",
    "DEFAULT_CHUNK_TOKENS",
    "FORMAT_VERSION",
    "FormatVersionError",
    "IntegrityError",
    "InvalidInputError",
    "KVStore",
    "KVStoreError",
    "LoadResult",
    "ModelInfo",
    "ModelRetiredError",
    "ModelSpec",
    "ObjectNotFoundError",
    "SaveResult",
    "StoreConfigError",
    "StoreOptions",
    "StorePermissionError",
    "StoreStats",
    "StoreUnavailableError",
    "SyncStore",
    "WriteBackError",
    "__version__",
    "open",
    "sync",
}


def test_exported_names_are_exactly_the_public_api() -> None:
    assert set(kvstore.__all__) == EXPECTED
    for name in kvstore.__all__:
        assert hasattr(kvstore, name), name


def test_no_gc_at_top_level() -> None:
    # kvstore.gc would shadow the built-in module in `from kvstore import *` users.
    assert "gc" not in kvstore.__all__


def test_every_error_is_a_kvstore_error() -> None:
    errors = [getattr(kvstore, n) for n in kvstore.__all__ if n.endswith("Error")]
    assert len(errors) == 11
    for err in errors:
        assert issubclass(err, kvstore.KVStoreError)
    assert issubclass(kvstore.InvalidInputError, ValueError)
    assert issubclass(kvstore.StorePermissionError, kvstore.StoreUnavailableError)
    assert issubclass(kvstore.CircuitOpenError, kvstore.StoreUnavailableError)


def test_import_kvstore_leaves_optional_parts_unimported() -> None:
    code = (
        "import sys, kvstore\n"
        "heavy = ['cupy', 's3fs', 'aioboto3', 'aiobotocore', 'zarr', 'click', 'rich', 'kvstore.cli', 'transformers']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
