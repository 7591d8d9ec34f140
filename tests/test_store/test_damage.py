"""Damaged data never comes back as tensors: it shortens the hit, is counted, and is repaired by the next save.

Every test runs on a local directory and on ``memory://``. The prompt is 4 full
chunks and a tail; damaging chunk k must give a hit of exactly k chunks, bit-exact.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import fsspec
import msgpack
import numpy as np
import pytest
import torch
from _damage_helpers import (
    CT,
    SPEC,
    assert_kv_equal,
    chunks_of,
    flip,
    listing,
    make_kv,
    make_tokens,
    raw_store,
    read_data,
    rewrite_header,
)

import kvstore
from kvstore.formats.keys import model_id
from kvstore.formats.layout import metadata_path, tails_prefix
from kvstore.formats.shard import crc32c, index_bytes
from kvstore.storage import ObjectStore

CODECS = ["none", "lz4", "blosc-lz4"]
N_TOKENS = 4 * CT + 5  # 4 full chunks and a tail of 5
N_CHUNKS = 5


@pytest.fixture(params=["local", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    root = f"/kvdamage-{uuid.uuid4().hex}"
    yield f"memory://{root}/kv"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def prompt() -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    return make_tokens(N_TOKENS, seed=1), make_kv(SPEC, N_TOKENS, seed=1)


# ---------------------------------------------------------------------- kinds of damage

Damage = Callable[[ObjectStore, list[tuple[object, str]], int], Awaitable[None]]


async def _edit(b: ObjectStore, prefix: str, edit: Callable[[bytes, object], bytes]) -> None:
    data, head = await read_data(b, prefix)
    await b.put(prefix, edit(data, head))


async def flip_layer_byte(b: ObjectStore, chunks: list, k: int) -> None:
    await _edit(b, chunks[k][1], lambda d, h: flip(d, (h.spans[1].offset + h.spans[1].end) // 2))  # type: ignore[attr-defined]


async def flip_layer_first_byte(b: ObjectStore, chunks: list, k: int) -> None:
    await _edit(b, chunks[k][1], lambda d, h: flip(d, h.spans[0].offset))  # type: ignore[attr-defined]


async def flip_layer_checksum(b: ObjectStore, chunks: list, k: int) -> None:
    await _edit(b, chunks[k][1], lambda d, h: flip(d, h.spans[2].end - 1))  # type: ignore[attr-defined]


async def flip_index_byte(b: ObjectStore, chunks: list, k: int) -> None:
    await _edit(b, chunks[k][1], lambda d, h: flip(d, 3))


async def flip_header_byte(b: ObjectStore, chunks: list, k: int) -> None:
    await _edit(b, chunks[k][1], lambda d, h: flip(d, 16 * SPEC.num_layers + 4 + 10))


async def truncate_object(b: ObjectStore, chunks: list, k: int) -> None:
    await _edit(b, chunks[k][1], lambda d, h: d[: len(d) // 2])


async def truncate_last_byte(b: ObjectStore, chunks: list, k: int) -> None:
    await _edit(b, chunks[k][1], lambda d, h: d[:-1])


async def empty_object(b: ObjectStore, chunks: list, k: int) -> None:
    await b.put(chunks[k][1], b"")


async def garbage_object(b: ObjectStore, chunks: list, k: int) -> None:
    await b.put(chunks[k][1], os.urandom(300))


async def swap_layers(b: ObjectStore, chunks: list, k: int) -> None:
    """Two layers (each with its own valid crc32c) in each other's place: only the header's crc list can tell."""

    def swap(d: bytes, h: object) -> bytes:
        s0, s1 = h.spans[0], h.spans[1]  # type: ignore[attr-defined]
        if s0.nbytes != s1.nbytes:  # compressed layers of other sizes: swap the index entries instead
            return flip(d, 0)
        return d[: s0.offset] + d[s1.offset : s1.end] + d[s0.offset : s0.end] + d[s1.end :]

    await _edit(b, chunks[k][1], swap)


async def layer_from_other_chunk(b: ObjectStore, chunks: list, k: int) -> None:
    other = 1 if k != 1 else 2
    theirs, th = await read_data(b, chunks[other][1])

    def graft(d: bytes, h: object) -> bytes:
        mine = h.spans[1]  # type: ignore[attr-defined]
        src = theirs[th.spans[1].offset : th.spans[1].end]
        if len(src) != mine.nbytes:  # compressed: another size, a damaged index follows
            return flip(d, 5)
        return d[: mine.offset] + src + d[mine.end :]

    await _edit(b, chunks[k][1], graft)


async def object_of_other_chunk(b: ObjectStore, chunks: list, k: int) -> None:
    """A whole valid data object, of another chunk (its header names another key)."""
    other = 1 if k != 1 else 2
    await b.put(chunks[k][1], await b.get(chunks[other][1]))


async def header_wrong_key(b: ObjectStore, chunks: list, k: int) -> None:
    await rewrite_header(b, chunks[k][1], key=b"\x00" * 32)


async def header_wrong_index(b: ObjectStore, chunks: list, k: int) -> None:
    await rewrite_header(b, chunks[k][1], index=k + 1)


async def header_wrong_tokens(b: ObjectStore, chunks: list, k: int) -> None:
    _, head = await read_data(b, chunks[k][1])
    await rewrite_header(b, chunks[k][1], num_tokens=head.header.num_tokens - 1)


async def header_wrong_crc(b: ObjectStore, chunks: list, k: int) -> None:
    _, head = await read_data(b, chunks[k][1])
    await rewrite_header(b, chunks[k][1], layer_crcs=flip(head.header.layer_crcs, 9))


async def header_other_codec(b: ObjectStore, chunks: list, k: int) -> None:
    """The header claims another known codec than the one the layers were written with."""
    _, head = await read_data(b, chunks[k][1])
    other = {"none": "lz4", "lz4": "blosc-lz4", "blosc-lz4": "none"}[head.header.codec]
    await rewrite_header(b, chunks[k][1], codec=other)


DATA_DAMAGE: list[Damage] = [
    flip_layer_byte,
    flip_layer_first_byte,
    flip_layer_checksum,
    flip_index_byte,
    flip_header_byte,
    truncate_object,
    truncate_last_byte,
    empty_object,
    garbage_object,
    swap_layers,
    layer_from_other_chunk,
]
HEADER_DAMAGE: list[Damage] = [
    object_of_other_chunk,
    header_wrong_key,
    header_wrong_index,
    header_wrong_tokens,
    header_wrong_crc,
    header_other_codec,
]


async def _save(url: str, codec: str, tokens: list[int], kv: list, **options: object) -> kvstore.SaveResult:
    async with kvstore.open(url, codec=codec, chunk_tokens=CT, **options) as store:  # type: ignore[arg-type]
        result = await store.save_prefix(SPEC, tokens, kv)
    assert result.num_tokens == len(tokens)
    return result


async def _check_damaged_load(url: str, codec: str, tokens: list[int], kv: list, k: int, damage: Damage) -> None:
    chunks = chunks_of(SPEC, tokens)
    assert len(chunks) == N_CHUNKS
    await _save(url, codec, tokens, kv)
    async with raw_store(url) as backend:
        await damage(backend, chunks, k)

    async with kvstore.open(url, codec=codec) as store:
        hit = await store.load_prefix(SPEC, tokens)
        assert hit.num_tokens == k * CT, f"{damage.__name__} on chunk {k}"
        assert hit.chunks_loaded == k
        assert hit.chunks_damaged >= 1
        assert_kv_equal(hit.kv, kv, k * CT)
        assert store.stats().chunks_damaged >= 1
        # repaired: the damaged chunk's data object is gone, so the chunk is now simply absent
        assert await store.lookup(SPEC, tokens) == k * CT
        again = await store.load_prefix(SPEC, tokens)
        assert (again.num_tokens, again.chunks_damaged) == (k * CT, 0)

        # Saving the prompt again rewrites the damaged chunk (and those after it); then it all hits.
        saved = await store.save_prefix(SPEC, tokens, kv)
        assert saved.chunks_written >= 1
        assert saved.chunks_written + saved.chunks_skipped == N_CHUNKS
        full = await store.load_prefix(SPEC, tokens)
        assert (full.num_tokens, full.chunks_loaded, full.chunks_damaged) == (N_TOKENS, N_CHUNKS, 0)
        assert_kv_equal(full.kv, kv, N_TOKENS)


@pytest.mark.parametrize("k", [0, 2, 4])
@pytest.mark.parametrize("damage", DATA_DAMAGE, ids=lambda d: d.__name__)
@pytest.mark.parametrize("codec", CODECS)
async def test_damaged_data_object_ends_the_hit(
    url: str, codec: str, damage: Damage, k: int, prompt: tuple[list[int], list]
) -> None:
    await _check_damaged_load(url, codec, *prompt, k, damage)


@pytest.mark.parametrize("k", [0, 3, 4])
@pytest.mark.parametrize("damage", HEADER_DAMAGE, ids=lambda d: d.__name__)
async def test_lying_header_ends_the_hit(url: str, damage: Damage, k: int, prompt: tuple[list[int], list]) -> None:
    await _check_damaged_load(url, "lz4", *prompt, k, damage)


@pytest.mark.parametrize("codec", CODECS)
async def test_damage_in_a_tail_found_through_its_marker(url: str, codec: str, prompt: tuple[list[int], list]) -> None:
    """A longer query finds the saved tail by its marker; a damaged tail still ends the hit before it."""
    tokens, kv = prompt
    await _save(url, codec, tokens, kv)
    chunks = chunks_of(SPEC, tokens)
    async with raw_store(url) as backend:
        await flip_layer_byte(backend, chunks, 4)
    async with kvstore.open(url) as store:
        longer = [*tokens, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        assert await store.lookup(SPEC, longer) == N_TOKENS  # lookup only sees that the object exists
        hit = await store.load_prefix(SPEC, longer)
        assert (hit.num_tokens, hit.chunks_damaged) == (4 * CT, 1)
        assert_kv_equal(hit.kv, kv, 4 * CT)
        assert store.stats().chunks_damaged == 1


async def test_damage_in_several_chunks_ends_the_hit_at_the_first(url: str, prompt: tuple[list[int], list]) -> None:
    tokens, kv = prompt
    await _save(url, "none", tokens, kv)
    chunks = chunks_of(SPEC, tokens)
    async with raw_store(url) as backend:
        await flip_layer_byte(backend, chunks, 3)
        await truncate_object(backend, chunks, 1)
        await garbage_object(backend, chunks, 4)
    async with kvstore.open(url) as store:
        hit = await store.load_prefix(SPEC, tokens)
        assert hit.num_tokens == CT
        assert hit.chunks_damaged >= 1
        assert_kv_equal(hit.kv, kv, CT)


async def test_deleted_data_object_is_a_shorter_hit_not_damage(url: str, prompt: tuple[list[int], list]) -> None:
    tokens, kv = prompt
    await _save(url, "none", tokens, kv)
    chunks = chunks_of(SPEC, tokens)
    async with raw_store(url) as backend:
        await backend.delete([chunks[2][1]])
    async with kvstore.open(url) as store:
        hit = await store.load_prefix(SPEC, tokens)
        assert (hit.num_tokens, hit.chunks_damaged) == (2 * CT, 0)
        assert_kv_equal(hit.kv, kv, 2 * CT)


async def test_repair_false_keeps_the_damaged_chunk(url: str, prompt: tuple[list[int], list]) -> None:
    tokens, kv = prompt
    await _save(url, "none", tokens, kv)
    chunks = chunks_of(SPEC, tokens)
    async with raw_store(url) as backend:
        await flip_layer_byte(backend, chunks, 1)
    async with kvstore.open(url, repair=False) as store:
        for _ in range(2):
            hit = await store.load_prefix(SPEC, tokens)
            assert (hit.num_tokens, hit.chunks_damaged) == (CT, 1)
            assert_kv_equal(hit.kv, kv, CT)
        assert store.stats().chunks_damaged == 2
        assert store.stats().requests_delete == 0
        async with raw_store(url) as backend:
            assert await backend.head(chunks[1][1]) is not None
        # the data object is still there, so a save skips the chunk and the damage stays
        saved = await store.save_prefix(SPEC, tokens, kv)
        assert saved.chunks_written == 0
        assert (await store.load_prefix(SPEC, tokens)).num_tokens == CT
    async with kvstore.open(url) as store:  # repair=True (the default) retires it; the next save rewrites it
        assert (await store.load_prefix(SPEC, tokens)).num_tokens == CT
        async with raw_store(url) as backend:
            assert await backend.head(chunks[1][1]) is None
        assert (await store.save_prefix(SPEC, tokens, kv)).chunks_written >= 1
        full = await store.load_prefix(SPEC, tokens)
        assert full.num_tokens == N_TOKENS
        assert_kv_equal(full.kv, kv, N_TOKENS)


@pytest.mark.parametrize("version", [0, 1, 99])
async def test_chunk_of_another_format_version_is_a_miss_and_left_alone(
    url: str, version: int, prompt: tuple[list[int], list]
) -> None:
    tokens, kv = prompt
    await _save(url, "none", tokens, kv)
    chunks = chunks_of(SPEC, tokens)
    async with raw_store(url) as backend:
        await _edit(backend, chunks[2][1], lambda d, h: _with_format(d, h, version))
        before = await backend.get(chunks[2][1])
    async with kvstore.open(url) as store:
        hit = await store.load_prefix(SPEC, tokens)
        assert hit.num_tokens == 2 * CT
        assert hit.chunks_damaged == 0  # not damage: a newer writer's record
        assert_kv_equal(hit.kv, kv, 2 * CT)
    async with raw_store(url) as backend:
        assert await backend.get(chunks[2][1]) == before


def _with_format(data: bytes, head: object, version: int) -> bytes:
    """The data object with its header's ``format`` field set to ``version`` (checksums kept consistent)."""
    h = head  # a ShardHead
    start, end = index_bytes(SPEC.num_layers), h.spans[0].offset  # type: ignore[attr-defined]
    obj = msgpack.unpackb(data[start : end - 4])
    obj["format"] = version
    body = msgpack.packb(obj, use_bin_type=True)
    assert len(body) == end - 4 - start  # same width, so the index stays valid
    return data[:start] + body + crc32c([body]).to_bytes(4, "little") + data[end:]


# ---------------------------------------------------------------------- zarr.json is not on the read path


@pytest.mark.parametrize("how", ["delete", "garbage", "other-dtype"])
@pytest.mark.parametrize("codec", CODECS)
async def test_zarr_json_is_not_on_the_read_path(
    url: str, codec: str, how: str, prompt: tuple[list[int], list]
) -> None:
    tokens, kv = prompt
    await _save(url, codec, tokens, kv)
    chunks = chunks_of(SPEC, tokens)
    async with raw_store(url) as backend:
        for path in {metadata_path(model_id(SPEC), k.num_tokens) for k, _ in chunks}:
            if how == "delete":
                await backend.delete([path])
            elif how == "garbage":
                await backend.put(path, b"\xff{not json")
            else:
                await backend.put(path, (await backend.get(path)).replace(b'"uint16"', b'"float64"'))
    async with kvstore.open(url) as store:
        hit = await store.load_prefix(SPEC, tokens)
        assert (hit.num_tokens, hit.chunks_loaded, hit.chunks_damaged) == (N_TOKENS, N_CHUNKS, 0)
        assert_kv_equal(hit.kv, kv, N_TOKENS)
        # a load reads each chunk's data object, nothing else
        assert store.stats().requests_get == N_CHUNKS  # one read per chunk (a local file: pread + preadv)
        assert await store.lookup(SPEC, tokens) == N_TOKENS


# ---------------------------------------------------------------------- foreign objects


async def test_foreign_objects_beside_tail_markers_are_ignored(url: str, prompt: tuple[list[int], list]) -> None:
    tokens, kv = prompt
    await _save(url, "none", tokens, kv)
    chunks = chunks_of(SPEC, tokens)
    tails = tails_prefix(model_id(SPEC), chunks[4][0].parent)
    async with raw_store(url) as backend:
        for name in ("abc", "0", "-3", "3.5", "99999999999", "003", "²", "٣", "3x"):
            await backend.put(tails + name, b"junk")
    longer = [*tokens, *range(20)]
    async with kvstore.open(url) as store:
        assert await store.lookup(SPEC, longer) == N_TOKENS
        hit = await store.load_prefix(SPEC, longer)
        assert (hit.num_tokens, hit.chunks_damaged) == (N_TOKENS, 0)
        assert_kv_equal(hit.kv, kv, N_TOKENS)


# ---------------------------------------------------------------------- a writer killed mid-save

HELPERS_DIR = str(Path(__file__).resolve().parent)
CRASH_PROMPTS = 60
CRASH_TOKENS = 40 * CT + 5

_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from _damage_helpers import CT, SPEC, make_kv, make_tokens
    import kvstore

    url, count, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = kvstore.sync.open(url, chunk_tokens=CT)
    for i in range(count):
        store.save_prefix(SPEC, make_tokens(n, i), make_kv(SPEC, n, i))
        print(i, flush=True)
    store.close()
    """
)


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the child did not report its saves in time"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            assert line, f"the child exited early: {proc.wait()}"
            return line


def _save_in_a_child_then_kill_it(store_dir: str) -> list[int]:
    """Run the saving child, SIGKILL it part-way into a save; return the indices it reported saved."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, HELPERS_DIR, store_dir, str(CRASH_PROMPTS), str(CRASH_TOKENS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        reported: list[int] = []
        stamps: list[float] = []
        while len(reported) < 3:
            reported.append(int(_read_line(proc, deadline)))
            stamps.append(time.monotonic())
        # kill the child part-way into its next save
        time.sleep(0.5 * (stamps[-1] - stamps[0]) / (len(stamps) - 1))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert proc.stdout is not None
        reported += [int(line) for line in proc.stdout.read().split()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return reported


async def test_sigkill_mid_save_never_yields_wrong_data(tmp_path: Path) -> None:
    store_dir = str(tmp_path / "store")
    reported = await asyncio.to_thread(_save_in_a_child_then_kill_it, store_dir)
    assert reported == list(range(len(reported)))
    assert len(reported) < CRASH_PROMPTS, "the child finished before it was killed"

    async with kvstore.open(store_dir) as store:
        for i in reported:
            tokens, kv = make_tokens(CRASH_TOKENS, i), make_kv(SPEC, CRASH_TOKENS, i)
            hit = await store.load_prefix(SPEC, tokens)
            assert (hit.num_tokens, hit.chunks_damaged) == (CRASH_TOKENS, 0), f"prompt {i}"
            assert_kv_equal(hit.kv, kv, CRASH_TOKENS)

        partial = len(reported)
        tokens, kv = make_tokens(CRASH_TOKENS, partial), make_kv(SPEC, CRASH_TOKENS, partial)
        hit = await store.load_prefix(SPEC, tokens)
        assert hit.num_tokens in {*range(0, CRASH_TOKENS, CT), CRASH_TOKENS}
        assert hit.chunks_damaged == 0
        assert_kv_equal(hit.kv, kv, hit.num_tokens)
        assert await store.lookup(SPEC, tokens) >= hit.num_tokens

        saved = await store.save_prefix(SPEC, tokens, kv)
        assert saved.num_tokens == CRASH_TOKENS
        full = await store.load_prefix(SPEC, tokens)
        assert (full.num_tokens, full.chunks_damaged) == (CRASH_TOKENS, 0)
        assert_kv_equal(full.kv, kv, CRASH_TOKENS)

        never = make_tokens(CRASH_TOKENS, partial + 1)
        miss = await store.load_prefix(SPEC, never)
        assert miss.num_tokens in {*range(0, CRASH_TOKENS, CT), CRASH_TOKENS}
        assert_kv_equal(miss.kv, make_kv(SPEC, CRASH_TOKENS, partial + 1), miss.num_tokens)


# ---------------------------------------------------------------------- bad input writes nothing


def _kv_variant(kind: str) -> object:
    kv = make_kv(SPEC, 20, seed=3)
    if kind == "too-few-layers":
        return kv[:-1]
    if kind == "too-many-layers":
        return [*kv, kv[0]]
    if kind == "wrong-token-count":
        return [(k[:19], v[:19]) for k, v in kv]
    if kind == "wrong-heads":
        return [(k.reshape(20, 1, 16), v.reshape(20, 1, 16)) for k, v in kv]
    if kind == "wrong-head-dim":
        return [(k[..., :4], v[..., :4]) for k, v in kv]
    if kind == "flat":
        return [(k.reshape(-1), v.reshape(-1)) for k, v in kv]
    if kind == "wrong-dtype":
        return [(k.float(), v.float()) for k, v in kv]
    if kind == "v-wrong-dtype":
        return [(k, v.half()) for k, v in kv]
    if kind == "numpy":
        return [(k.float().numpy(), v.float().numpy()) for k, v in kv]
    if kind == "not-pairs":
        return [(k,) for k, _ in kv]
    if kind == "empty":
        return []
    if kind == "none":
        return None
    if kind == "tensor":
        return torch.stack([torch.stack([k, v]) for k, v in kv])
    raise AssertionError(kind)


BAD_KV = [
    "too-few-layers",
    "too-many-layers",
    "wrong-token-count",
    "wrong-heads",
    "wrong-head-dim",
    "flat",
    "wrong-dtype",
    "v-wrong-dtype",
    "numpy",
    "not-pairs",
    "empty",
    "none",
    "tensor",
]

GOOD_TOKENS = list(range(20))
BAD_TOKENS: dict[str, object] = {
    "floats": [float(t) for t in GOOD_TOKENS],
    "float-array": np.arange(20, dtype=np.float32),
    "float-tensor": torch.arange(20, dtype=torch.float32),
    "bools": [True] * 20,
    "strings": [str(t) for t in GOOD_TOKENS],
    "str": "0123456789abcdefghij",
    "negative": [-1, *GOOD_TOKENS[1:]],
    "negative-array": np.array([-1, *GOOD_TOKENS[1:]], dtype=np.int64),
    "negative-tensor": torch.tensor([-1, *GOOD_TOKENS[1:]]),
    "2**32": [*GOOD_TOKENS[:-1], 2**32],
    "2**64": [*GOOD_TOKENS[:-1], 2**64],
    "2**32-array": np.array([*GOOD_TOKENS[:-1], 2**32], dtype=np.uint64),
    "2**32-tensor": torch.tensor([*GOOD_TOKENS[:-1], 2**32]),
    "2-d-list": [GOOD_TOKENS[:10], GOOD_TOKENS[10:]],
    "2-d-array": np.arange(20).reshape(2, 10),
    "2-d-tensor": torch.arange(20).reshape(1, 20),
    "none": None,
    "int": 20,
}


async def _assert_writes_nothing(url: str, call: Callable[[kvstore.KVStore], Awaitable[object]]) -> None:
    async with kvstore.open(url, chunk_tokens=CT) as store:
        before = await listing(url)
        with pytest.raises(kvstore.InvalidInputError) as info:
            await call(store)
        assert isinstance(info.value, ValueError)
        assert await listing(url) == before


@pytest.mark.parametrize("kind", BAD_KV)
async def test_save_with_bad_kv(url: str, kind: str) -> None:
    kv = _kv_variant(kind)
    await _assert_writes_nothing(url, lambda s: s.save_prefix(SPEC, GOOD_TOKENS, kv))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_save_load_lookup_with_bad_tokens(url: str, kind: str) -> None:
    tokens = BAD_TOKENS[kind]
    kv = make_kv(SPEC, 20, seed=3)
    await _assert_writes_nothing(url, lambda s: s.save_prefix(SPEC, tokens, kv))  # type: ignore[arg-type]
    await _assert_writes_nothing(url, lambda s: s.load_prefix(SPEC, tokens))  # type: ignore[arg-type]
    await _assert_writes_nothing(url, lambda s: s.lookup(SPEC, tokens))  # type: ignore[arg-type]


async def test_save_with_empty_tokens(url: str) -> None:
    empty = [(k[:0], v[:0]) for k, v in make_kv(SPEC, 1, seed=3)]
    for tokens in ([], np.zeros(0, np.int64), torch.zeros(0, dtype=torch.int64)):
        await _assert_writes_nothing(url, lambda s, t=tokens: s.save_prefix(SPEC, t, empty))


@pytest.mark.parametrize("spec", [None, "damage@v1", ("damage", "v1", 3, 2, 8, torch.bfloat16), {"name": "damage"}])
async def test_spec_must_be_a_model_spec(url: str, spec: object) -> None:
    kv = make_kv(SPEC, 20, seed=3)
    await _assert_writes_nothing(url, lambda s: s.save_prefix(spec, GOOD_TOKENS, kv))  # type: ignore[arg-type]
    await _assert_writes_nothing(url, lambda s: s.load_prefix(spec, GOOD_TOKENS))  # type: ignore[arg-type]
    await _assert_writes_nothing(url, lambda s: s.lookup(spec, GOOD_TOKENS))  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["gpu:0", "nonsense", "", "cpu:x", None, 2.5])
async def test_bad_device(url: str, device: object, prompt: tuple[list[int], list]) -> None:
    tokens, kv = prompt
    await _save(url, "none", tokens, kv)
    await _assert_writes_nothing(url, lambda s: s.load_prefix(SPEC, tokens, device=device))  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_unavailable_device_is_bad_input(url: str, prompt: tuple[list[int], list]) -> None:
    """'cuda' is a valid device name, but on a machine without CUDA it is bad input, not an AssertionError."""
    tokens, kv = prompt
    await _save(url, "none", tokens, kv)
    await _assert_writes_nothing(url, lambda s: s.load_prefix(SPEC, tokens, device="cuda"))


@pytest.mark.parametrize(
    "options",
    [
        {"codec": "zstd"},
        {"codec": ""},
        {"chunk_tokens": 0},
        {"chunk_tokens": -16},
        {"chunk_tokens": 2**24 + 1},
        {"chunk_tokens": 16.0},
        {"chunk_tokens": "16"},
        {"chunk_tokens": True},
        {"max_concurrency": 0},
    ],
    ids=repr,
)
async def test_bad_open_options_write_nothing(url: str, options: dict[str, object]) -> None:
    with pytest.raises(kvstore.InvalidInputError) as info:
        async with kvstore.open(url, **options):  # type: ignore[arg-type]
            pass
    assert isinstance(info.value, ValueError)
    assert await listing(url) == {}


# ---------------------------------------------------------------------- root record of another version


@pytest.mark.parametrize("version", [0, 1, 2, 7])
async def test_store_of_another_format_version_is_refused(url: str, version: int) -> None:
    root = msgpack.packb({"format": version, "magic": "kvstore", "chunk_tokens": CT, "created": 0.0}, use_bin_type=True)
    async with raw_store(url) as backend:
        await backend.put("kvstore.msgpack", root)
    with pytest.raises(kvstore.FormatVersionError) as info:
        async with kvstore.open(url):
            pass
    # the message names both versions: the store's and the one this kvstore reads
    assert f"format version {version};" in str(info.value)
    assert f"reads format version {kvstore.FORMAT_VERSION} only" in str(info.value)
    with pytest.raises(kvstore.FormatVersionError):
        kvstore.sync.open(url).close()
    if not url.startswith("memory://"):  # the CLI says the same in one line
        from click.testing import CliRunner

        from kvstore.cli.main import cli

        out = await asyncio.to_thread(CliRunner().invoke, cli, ["ls", url])
        assert out.exit_code == 1
        assert out.output.count("\n") == 1
        assert f"format version {version};" in out.output
    assert await listing(url) == {"kvstore.msgpack": len(root)}  # refused, not rewritten


@pytest.mark.parametrize(
    "data", [b"", b"\x00garbage", msgpack.packb({"format": kvstore.FORMAT_VERSION, "magic": "zarr"})], ids=repr
)
async def test_damaged_root_record_is_an_integrity_error(url: str, data: bytes) -> None:
    async with raw_store(url) as backend:
        await backend.put("kvstore.msgpack", data)
    with pytest.raises(kvstore.IntegrityError):
        async with kvstore.open(url):
            pass
    async with raw_store(url) as backend:
        assert await backend.get("kvstore.msgpack") == data
