"""The public API is deliberate: guard its names and keep optional parts unimported."""

from __future__ import annotations

import ast
import concurrent.futures
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        "heavy = ['cupy', 's3fs', 'aioboto3', 'aiobotocore', 'zarr', 'click', 'rich', 'kvstore.cli', 'transformers',\n"
        "         'prometheus_client', 'kvstore.metrics']\n"
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


def _readme_open_options() -> list[tuple[str, str | None]]:
    """The parameters of the README API table's ``kvstore.open(...)`` row: ``(name, default text)``."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [row] = [line for line in readme.splitlines() if line.startswith("| `kvstore.open(")]
    inside = re.fullmatch(r"\| `kvstore\.open\((.*)\)` \|.*", row)
    assert inside, row
    params = []
    for item in re.split(r",\s*", inside.group(1)):
        name, _, default = item.partition("=")
        params.append((name.strip(), default.strip() if default else None))
    return params


def _readme_value(text: str) -> object:
    """A default as the README writes it: a Python literal, ``RetryPolicy()`` or a size like ``1 GiB``."""
    size = re.fullmatch(r"(\d+) (KiB|MiB|GiB)", text)
    if size:
        return int(size.group(1)) << {"KiB": 10, "MiB": 20, "GiB": 30}[size.group(2)]
    if text == "RetryPolicy()":
        return kvstore.RetryPolicy()
    return ast.literal_eval(text)


def test_readme_open_row_lists_every_option_with_its_default() -> None:
    documented = _readme_open_options()
    signature = inspect.signature(kvstore.open).parameters
    assert documented[:2] == [("url", None), ("*", None)]
    assert [name for name, _ in documented[2:]] == list(signature)[1:]  # every option, in order
    for name, default in documented[2:]:
        param = signature[name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert default is not None, name
        assert _readme_value(default) == param.default, name


def test_sync_store_mirrors_every_public_method_of_kvstore(tmp_path: Path) -> None:
    from kvstore.sync import NOT_MIRRORED

    with kvstore.sync.open(tmp_path) as sync_store:
        store = sync_store._store
        public = sorted({n for n in dir(store) if not n.startswith("_")})
        for name in public:
            assert hasattr(sync_store, name) or name in NOT_MIRRORED, f"SyncStore lacks {name}"
            member = getattr(type(store), name, None)
            if not callable(member):
                continue
            mirrored = inspect.signature(getattr(sync_store, name)).parameters
            for param in inspect.signature(member).parameters:
                if param != "self":
                    assert param in mirrored or f"{name}({param}=)" in NOT_MIRRORED, f"SyncStore.{name} lacks {param}"
    assert {"prefetch", "has_prefetch", "options"} <= set(public)


def test_open_sets_the_budgets_and_the_sync_store_prefetches(tmp_path: Path) -> None:
    spec = kvstore.ModelSpec("m", "1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    tokens = list(range(24))
    kv = [(torch.randn(24, 2, 8), torch.randn(24, 2, 8)) for _ in range(2)]
    with kvstore.sync.open(tmp_path, chunk_tokens=8, writeback_budget=1000, prefetch_budget=10**6) as store:
        assert (store.options.writeback_budget, store.options.prefetch_budget) == (1000, 10**6)
        store.save_prefix(spec, tokens, kv)
        assert not store.has_prefetch(spec, tokens)
        handle = store.prefetch(spec, tokens)
        assert store.has_prefetch(spec, tokens)
        prefetched = handle.result()
        assert handle.done()
        assert prefetched.num_tokens == 24
        assert (handle.chunks_done, handle.bytes_done) == (3, prefetched.bytes_read)
        hit = store.load_prefix(spec, tokens)  # joins the prefetch: nothing is read again
        assert not store.has_prefetch(spec, tokens)
        assert torch.equal(hit.kv[1][1], kv[1][1])
        assert store.stats().bytes_read == prefetched.bytes_read
        store.prefetch(spec, tokens[:16]).cancel()
        assert not store.has_prefetch(spec, tokens[:16])
    with kvstore.sync.open(tmp_path, prefetch_budget=10) as store:  # too small to hold any prefetch
        dropped = store.prefetch(spec, tokens)
        assert not store.has_prefetch(spec, tokens)
        with pytest.raises(concurrent.futures.CancelledError):
            dropped.result()
