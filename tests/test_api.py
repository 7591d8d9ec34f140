"""The public API is deliberate: guard its names and keep optional parts unimported."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import kvstore

EXPECTED = {
    "CircuitOpenError",
    "RetryPolicy",
    "SaveHandle",
    "DEFAULT_CHUNK_TOKENS",
    "FORMAT_VERSION",
    "FormatVersionError",
    "IntegrityError",
    "InvalidInputError",
    "KVStore",
    "KVStoreError",
    "LayerStream",
    "LoadResult",
    "ModelInfo",
    "ModelRetiredError",
    "ModelSpec",
    "ObjectNotFoundError",
    "PrefetchHandle",
    "SaveResult",
    "StorageError",
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
    assert len(errors) == 12
    for err in errors:
        assert issubclass(err, kvstore.KVStoreError)
    assert issubclass(kvstore.InvalidInputError, ValueError)
    assert issubclass(kvstore.StorePermissionError, kvstore.StoreUnavailableError)
    assert issubclass(kvstore.CircuitOpenError, kvstore.StoreUnavailableError)
    for boundary_error in (kvstore.ObjectNotFoundError, kvstore.StoreUnavailableError):
        assert issubclass(boundary_error, kvstore.StorageError)


def test_import_kvstore_leaves_optional_parts_unimported() -> None:
    code = (
        "import sys, kvstore\n"
        "heavy = ['cupy', 's3fs', 'aioboto3', 'aiobotocore', 'zarr', 'click', 'rich', 'kvstore.cli', 'transformers']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cpu_saves_and_loads_never_import_cupy(tmp_path: object) -> None:
    # cupy is imported only when a CUDA device is staged, never by kvstore.gpu itself or a CPU round trip.
    code = (
        "import asyncio, sys, torch, kvstore, kvstore.gpu\n"
        "spec = kvstore.ModelSpec('m', 'v1', 2, 2, 4, torch.float16)\n"
        "kv = [(torch.zeros(8, 2, 4, dtype=torch.float16),) * 2 for _ in range(2)]\n"
        "async def main():\n"
        f"    async with kvstore.open({str(tmp_path)!r}) as store:\n"
        "        await store.save_prefix(spec, list(range(8)), kv)\n"
        "        await (await store.save_prefix(spec, list(range(9, 17)), kv, wait=False))\n"
        "        assert (await store.load_prefix(spec, list(range(8)))).num_tokens == 8\n"
        "asyncio.run(main())\n"
        "print('cupy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sync_open_takes_every_option_of_open(tmp_path: Path) -> None:
    from kvstore.opening import OpenOptions

    assert set(OpenOptions.__annotations__) == set(inspect.signature(kvstore.open).parameters) - {"url"}
    with kvstore.sync.open(tmp_path, namespace="tenant-a", fail_open=False, memory_cache_bytes=1 << 20) as store:
        assert store.url.endswith("namespaces/tenant-a")
