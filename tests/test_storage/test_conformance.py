"""The ObjectStore contract, run against every backend: memory, a local directory and S3 (moto and Ceph RGW).

What kvstore's upper layers rely on: keys and bytes only, ``create_only`` puts
that never overwrite, HEAD and listings that see objects (not directories),
idempotent deletes, and nothing but kvstore's exception tree escaping.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_asyncio

import kvstore
from kvstore.storage import LocalObjectStore, ObjectMeta, ObjectStore, open_object_store


@pytest_asyncio.fixture(loop_scope="function")
async def store(store_url: tuple[str, dict | None]) -> AsyncIterator[ObjectStore]:
    """The backend under test, opened in the test's own event loop."""
    url, options = store_url
    backend = await open_object_store(url, options)
    try:
        yield backend
    finally:
        await backend.close()


async def _listing(store: ObjectStore, prefix: str) -> dict[str, int]:
    return {m.key: m.size async for m in store.list(prefix)}


class TestObjectStoreConformance:
    """One contract, every backend (parametrized through the ``store_url`` fixture)."""

    # ------------------------------------------------------------------ get

    async def test_put_then_get_returns_the_bytes(self, store: ObjectStore) -> None:
        assert await store.put("a/b/object", b"\x00payload\xff") is True
        assert await store.get("a/b/object") == b"\x00payload\xff"
        assert await store.put("empty", b"") is True
        assert await store.get("empty") == b""

    async def test_get_missing_key_raises_object_not_found(self, store: ObjectStore) -> None:
        with pytest.raises(kvstore.ObjectNotFoundError) as info:
            await store.get("no/such/key")
        assert isinstance(info.value, KeyError)  # callers may catch it as a KeyError too
        assert "no/such/key" in str(info.value)

    async def test_get_of_a_key_that_is_only_a_prefix_is_not_found(self, store: ObjectStore) -> None:
        # Object stores have no directories: "a/b" is missing even though "a/b/c" exists.
        await store.put("a/b/c", b"x")
        with pytest.raises(kvstore.ObjectNotFoundError):
            await store.get("a/b")

    async def test_get_below_an_object_is_not_found(self, store: ObjectStore) -> None:
        # "a/b" is an object, so nothing can live at "a/b/c" on a file system; it is simply missing.
        await store.put("a/b", b"x")
        with pytest.raises(kvstore.ObjectNotFoundError):
            await store.get("a/b/c")
        with pytest.raises(kvstore.ObjectNotFoundError):
            await store.get_range_into("a/b/c", 0, [memoryview(bytearray(1))])
        assert await store.head("a/b/c") is None

    async def test_plain_put_overwrites(self, store: ObjectStore) -> None:
        await store.put("k", b"first")
        assert await store.put("k", b"second, longer") is True
        assert await store.get("k") == b"second, longer"

    # ------------------------------------------------------------------ create_only

    async def test_create_only_writes_a_new_object(self, store: ObjectStore) -> None:
        assert await store.put("fresh/key", b"data", create_only=True) is True
        assert await store.get("fresh/key") == b"data"

    async def test_create_only_leaves_an_existing_object_untouched(self, store: ObjectStore) -> None:
        await store.put("k", b"original")
        before = await store.head("k")
        assert await store.put("k", b"replacement!", create_only=True) is False
        assert await store.get("k") == b"original"
        after = await store.head("k")
        assert before is not None
        assert after == before  # not rewritten: same size and mtime

    async def test_concurrent_create_only_puts_have_one_winner(self, store: ObjectStore) -> None:
        # kvstore.open relies on this to agree on a new store's root record.
        payloads = [f"writer-{i:02d}".encode() for i in range(8)]
        created = await asyncio.gather(*(store.put("race", p, create_only=True) for p in payloads))
        assert sum(created) == 1, created
        assert await store.get("race") == payloads[created.index(True)]

    def test_sixteen_racing_writers_of_one_key_have_one_winner(self, store_url: tuple[str, dict | None]) -> None:
        # Defect 10: create-only must be decided by the backend in one step, not checked and then written.
        # Each writer has its own store (own connection, own event loop, own thread), all released at once.
        writers, rounds = 16, 3
        barrier = threading.Barrier(writers)
        results: list[list[bool]] = [[False] * writers for _ in range(rounds)]

        async def write_all(i: int) -> None:
            backend = await open_object_store(*store_url)
            try:
                for r in range(rounds):
                    await asyncio.to_thread(barrier.wait, 60)
                    results[r][i] = await backend.put(f"race/{r}", f"writer-{i:02d}".encode(), create_only=True)
            finally:
                await backend.close()

        with ThreadPoolExecutor(writers) as pool:
            for done in [pool.submit(asyncio.run, write_all(i)) for i in range(writers)]:
                done.result(timeout=120)

        async def stored() -> list[bytes]:
            backend = await open_object_store(*store_url)
            try:
                return [await backend.get(f"race/{r}") for r in range(rounds)]
            finally:
                await backend.close()

        for r, data in enumerate(asyncio.run(stored())):
            assert sum(results[r]) == 1, f"round {r}: winners {[i for i, won in enumerate(results[r]) if won]}"
            assert data == f"writer-{results[r].index(True):02d}".encode()

    # ------------------------------------------------------------------ head

    async def test_head_of_missing_key_is_none(self, store: ObjectStore) -> None:
        assert await store.head("missing") is None
        assert await store.head("deeply/nested/missing") is None

    async def test_head_reports_size_and_mtime(self, store: ObjectStore) -> None:
        started = time.time()
        await store.put("dir/obj", b"0123456789")
        meta = await store.head("dir/obj")
        assert isinstance(meta, ObjectMeta)
        assert meta.key == "dir/obj"
        assert meta.size == 10
        assert isinstance(meta.mtime, float)
        # S3 timestamps have one-second resolution; allow for it and for a little clock skew.
        assert started - 5 <= meta.mtime <= time.time() + 5

    async def test_head_of_a_key_that_is_only_a_prefix_is_none(self, store: ObjectStore) -> None:
        await store.put("a/b/c", b"x")
        assert await store.head("a/b") is None
        assert await store.head("a") is None

    async def test_head_many_answers_each_key_in_order(self, store: ObjectStore) -> None:
        await store.put("a/x", b"12")
        await store.put("a/y/z", b"123")
        metas = await store.head_many(["a/y/z", "missing", "a/x", "a/y"])
        assert [(m.key, m.size) if m else None for m in metas] == [("a/y/z", 3), None, ("a/x", 2), None]

    # ------------------------------------------------------------------ ranges

    async def test_get_range_returns_the_bytes_in_range(self, store: ObjectStore) -> None:
        data = bytes(range(10))
        await store.put("obj", data)
        assert await store.get_range("obj", 2, 7) == data[2:7]
        assert await store.get_range("obj", 0, 100) == data  # past the end: what there is
        assert await store.get_range("obj", 4, 4) == b""

    async def test_get_range_into_fills_buffers_in_order(self, store: ObjectStore) -> None:
        data = bytes(range(10))
        await store.put("obj", data)
        first, second = bytearray(3), bytearray(4)
        seen: list[int] = []
        filled = await store.get_range_into("obj", 2, [memoryview(first), memoryview(second)], then=seen.append)
        assert filled == 7
        assert seen == [7]
        assert bytes(first) == data[2:5]
        assert bytes(second) == data[5:9]

    async def test_get_range_into_reports_a_short_object_without_raising(self, store: ObjectStore) -> None:
        await store.put("obj", bytes(10))
        assert await store.get_range_into("obj", 6, [memoryview(bytearray(8))]) == 4

    async def test_get_range_into_then_may_raise(self, store: ObjectStore) -> None:
        await store.put("obj", bytes(10))

        def refuse(filled: int) -> None:
            raise kvstore.IntegrityError(f"{filled} bytes refused")

        with pytest.raises(kvstore.IntegrityError, match="10 bytes refused"):
            await store.get_range_into("obj", 0, [memoryview(bytearray(10))], then=refuse)

    async def test_ranges_of_a_missing_key_raise_object_not_found(self, store: ObjectStore) -> None:
        with pytest.raises(kvstore.ObjectNotFoundError):
            await store.get_range("missing", 0, 4)
        with pytest.raises(kvstore.ObjectNotFoundError):
            await store.get_range_into("missing", 0, [memoryview(bytearray(4))])

    async def test_ranges_of_a_key_that_is_only_a_prefix_are_not_found(self, store: ObjectStore) -> None:
        await store.put("a/b/c", b"x")
        with pytest.raises(kvstore.ObjectNotFoundError):
            await store.get_range("a/b", 0, 3)
        with pytest.raises(kvstore.ObjectNotFoundError):
            await store.get_range_into("a/b", 0, [memoryview(bytearray(3))])

    async def test_put_parts_create_only(self, store: ObjectStore) -> None:
        parts = [memoryview(b"ab"), memoryview(b"cd")]
        assert await store.put_parts("obj", parts, create_only=True) is True
        assert await store.put_parts("obj", [memoryview(b"zz")], create_only=True) is False
        assert await store.get("obj") == b"abcd"
        assert await store.put_parts("obj", [memoryview(b"zz")]) is True
        assert await store.get("obj") == b"zz"

    # ------------------------------------------------------------------ list

    async def test_list_streams_nested_keys_with_sizes(self, store: ObjectStore) -> None:
        objects = {
            "a/one": b"1",
            "a/b/two": b"22",
            "a/b/c/d/three": b"333",
            "a/e/four": b"4444",
            "ab/not-under-a": b"x",
            "other/five": b"55555",
        }
        for key, data in objects.items():
            await store.put(key, data)
        listing = store.list("a/")
        assert hasattr(listing, "__anext__"), "list() must return an async iterator"
        metas = [m async for m in listing]
        assert all(isinstance(m, ObjectMeta) for m in metas)
        assert {m.key: m.size for m in metas} == {"a/one": 1, "a/b/two": 2, "a/b/c/d/three": 3, "a/e/four": 4}
        assert len(metas) == 4  # no duplicates, no directory entries
        assert await _listing(store, "a/b/") == {"a/b/two": 2, "a/b/c/d/three": 3}
        assert await _listing(store, "") == {k: len(v) for k, v in objects.items()}

    async def test_list_of_a_missing_prefix_is_empty(self, store: ObjectStore) -> None:
        assert await _listing(store, "nothing/here/") == {}
        await store.put("x/y", b"1")
        assert await _listing(store, "nothing/here/") == {}

    async def test_list_can_stop_early(self, store: ObjectStore) -> None:
        for i in range(5):
            await store.put(f"p/{i}", b"x")
        listing = store.list("p/")
        first = await anext(listing)
        await listing.aclose()
        assert first.key.startswith("p/")

    # ------------------------------------------------------------------ delete

    async def test_delete_removes_objects(self, store: ObjectStore) -> None:
        for key in ("d/1", "d/2", "d/3/4", "keep"):
            await store.put(key, b"x")
        await store.delete(["d/1", "d/3/4"])
        assert await store.head("d/1") is None
        assert await store.head("d/3/4") is None
        assert await _listing(store, "") == {"d/2": 1, "keep": 1}

    async def test_delete_ignores_missing_keys(self, store: ObjectStore) -> None:
        await store.delete([])
        await store.delete(["never/existed"])
        await store.put("gone", b"x")
        await store.delete(["gone"])
        await store.delete(["gone"])
        assert await store.head("gone") is None

    async def test_delete_with_missing_keys_still_deletes_the_others(self, store: ObjectStore) -> None:
        for key in ("a", "m", "z"):
            await store.put(key, b"x")
        # Missing keys sorted before, between and after the present ones.
        await store.delete(["0-missing", "a", "b-missing", "m", "zz-missing", "z"])
        assert await _listing(store, "") == {}

    # ------------------------------------------------------------------ close

    async def test_objects_survive_close_and_reopen(self, store: ObjectStore, store_url: tuple[str, dict]) -> None:
        await store.put("durable/key", b"still here")
        await store.close()
        reopened = await open_object_store(*store_url)
        try:
            assert await reopened.get("durable/key") == b"still here"
            assert await _listing(reopened, "durable/") == {"durable/key": 10}
        finally:
            await reopened.close()

    async def test_many_concurrent_requests(self, store: ObjectStore) -> None:
        keys = [f"c/{i:03d}" for i in range(64)]
        assert all(await asyncio.gather(*(store.put(k, k.encode()) for k in keys)))
        assert await asyncio.gather(*(store.get(k) for k in keys)) == [k.encode() for k in keys]
        metas = await asyncio.gather(*(store.head(k) for k in keys))
        assert [m.size if m else None for m in metas] == [len(k) for k in keys]


# ---------------------------------------------------------------------- errors (backend-specific setups)

_WRITE_AS_OTHER_USER = textwrap.dedent(
    """
    import asyncio, sys
    import kvstore
    from kvstore.storage import LocalObjectStore
    print("imported")

    async def main():
        store = LocalObjectStore(sys.argv[1])
        try:
            await store.put("new/object", b"x")
        except kvstore.StorePermissionError as exc:
            assert isinstance(exc.__cause__, PermissionError), repr(exc.__cause__)
            print("StorePermissionError")
        else:
            print("no error")

    asyncio.run(main())
    """
)


def test_local_read_only_directory_raises_store_permission_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o555)
        try:
            with pytest.raises(kvstore.StorePermissionError) as info:
                asyncio.run(LocalObjectStore(root).put("new/object", b"x"))
        finally:
            root.chmod(0o755)
        assert isinstance(info.value.__cause__, PermissionError)
        assert isinstance(info.value, kvstore.StoreUnavailableError)
        return
    # root ignores file modes: write as an unprivileged user in a child process instead.
    nobody = 65534
    with tempfile.TemporaryDirectory(prefix="kvtest-ro-") as parent:  # under /tmp, which anyone may search
        root = Path(parent) / "ro"
        root.mkdir()
        root.chmod(0o555)
        Path(parent).chmod(0o755)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _WRITE_AS_OTHER_USER, str(root)],
                user=nobody,
                group=nobody,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd=parent,
            )
        except OSError as exc:
            pytest.skip(f"running as root, and cannot start Python as an unprivileged user: {exc}")
        finally:
            root.chmod(0o755)
    if "imported" not in proc.stdout:
        pytest.skip(f"running as root, and an unprivileged user cannot import kvstore: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["imported", "StorePermissionError"]


async def test_local_root_that_is_a_file_raises_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    store = LocalObjectStore(blocker)
    with pytest.raises(kvstore.StoreUnavailableError) as info:
        await store.put("k", b"x")
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.s3
async def test_s3_missing_bucket_raises_kvstore_errors(s3_store_url: tuple[str, dict]) -> None:
    _, options = s3_store_url
    store = await open_object_store("s3://kvtest-no-such-bucket-here/kv", options)
    try:
        with pytest.raises(kvstore.KVStoreError) as put_info:
            await store.put("k", b"x")
        with pytest.raises(kvstore.KVStoreError) as get_info:
            await store.get("k")
    finally:
        await store.close()
    # translated at the boundary with `raise ... from exc`: the backend error is kept
    assert put_info.value.__cause__ is not None
    assert get_info.value.__cause__ is not None


def test_open_object_store_rejects_unknown_local_options() -> None:
    with pytest.raises(kvstore.InvalidInputError):
        asyncio.run(open_object_store("/tmp/kv", {"endpoint_url": "http://x"}))


def test_open_object_store_rejects_an_empty_url() -> None:
    with pytest.raises(kvstore.InvalidInputError):
        asyncio.run(open_object_store(""))
