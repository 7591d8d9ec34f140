"""The data object (docs/FORMAT.md section 6.1): its limits, and refusal of damaged or hostile bytes.

Whatever bytes a store hands back for a data object, ``parse_head`` may only
succeed or raise IntegrityError / FormatVersionError, and what it accepts
stays inside the object. Together with each layer's crc32c, every change of a
single byte and every truncation is caught before a load could return it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore import FormatVersionError, IntegrityError, ModelSpec
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.formats.records import ChunkHeader, chunk_header_limit
from kvstore.formats.shard import (
    CRC_BYTES,
    ShardHead,
    crc32c,
    data_object,
    decode_layer,
    encode_layers,
    head_bytes,
    index_bytes,
    parse_head,
)
from kvstore.reading import check_chunk_head
from kvstore.storage import open_object_store

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = ModelSpec("shard", "v1", 3, 2, 4, torch.float16)
TOKENS = list(range(8))
MID = model_id(SPEC)
(KEY,) = chunk_keys(SPEC, normalize_tokens(TOKENS), 8)
RAW = 2 * KEY.num_tokens * SPEC.row_bytes  # decoded bytes of one layer


def _layers(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    half = RAW // 2
    return [
        (
            rng.standard_normal(half // 2).astype(np.float16).view(np.uint8),
            rng.standard_normal(half // 2).astype(np.float16).view(np.uint8),
        )
        for _ in range(SPEC.num_layers)
    ]


def _header(codec: str = "none", **changes: Any) -> ChunkHeader:
    fields: dict[str, Any] = {
        "key": KEY.digest,
        "parent": KEY.parent,
        "index": KEY.index,
        "model_id": MID,
        "num_tokens": KEY.num_tokens,
        "num_layers": SPEC.num_layers,
        "codec": codec,
        "layer_crcs": b"",  # data_object and _raw_object fill these in
        "created": 1700000000.0,
    }
    fields.update(changes)
    return ChunkHeader(**fields)


def _object(codec: str = "none", seed: int = 0, **changes: Any) -> bytes:
    layers = [(k.data, v.data) for k, v in _layers(seed)]
    stored = encode_layers(get_codec(codec), layers, 2)
    return b"".join(bytes(p) for p in data_object(_header(codec, **changes), stored))


def _crc(data: bytes) -> bytes:
    return crc32c([data]).to_bytes(CRC_BYTES, "little")


def _raw_object(header: ChunkHeader | bytes, inner: Sequence[bytes], order: Sequence[int] | None = None) -> bytes:
    """A data object assembled by hand (the header's crcs taken from ``inner``, unless given as bytes);
    ``order`` places the layers' bytes in another order."""
    if isinstance(header, ChunkHeader):
        header = dataclasses.replace(header, layer_crcs=b"".join(x[-CRC_BYTES:] for x in inner)).to_msgpack()
    frame = header + _crc(header)
    base = index_bytes(len(inner)) + len(frame)
    order = list(order or range(len(inner)))
    offsets: dict[int, int] = {}
    pos = base
    for layer in order:
        offsets[layer] = pos
        pos += len(inner[layer])
    index = b"".join(struct.pack("<QQ", offsets[n], len(inner[n])) for n in range(len(inner)))
    return index + _crc(index) + frame + b"".join(inner[n] for n in order)


def _read_all(data: bytes, head: ShardHead, codec: str = "none", *, verify: bool = True) -> list[bytes]:
    """Check and decode every layer the way a load does; IntegrityError on damage."""
    out = []
    for layer, span in enumerate(head.spans):
        buf = np.zeros(RAW, np.uint8)
        stored = memoryview(data)[span.offset : span.end]
        decode_layer(
            get_codec(codec), stored, (buf[: RAW // 2], buf[RAW // 2 :]), head.header.layer_crc(layer), verify=verify
        )
        out.append(buf.tobytes())
    return out


def _read_believing(data: bytes, size: int, codec: str) -> list[bytes]:
    """Read ``data`` as a reader that was told the object has ``size`` bytes."""
    return _read_all(data, parse_head(data, SPEC.num_layers, size), codec)


def _load(data: bytes, codec: str = "none", *, verify: bool = True) -> list[bytes]:
    head = parse_head(data, SPEC.num_layers, len(data))
    check_chunk_head(head, SPEC, MID, KEY, codec)
    return _read_all(data, head, codec, verify=verify)


async def _rewrite(store_url: Any, change: Callable[[bytes], bytes]) -> None:
    """Replace the stored data object of the test chunk by ``change(its bytes)``, behind the store's back."""
    backend = await open_object_store(store_url.url, store_url.storage_options)
    try:
        path = data_path(MID, KEY.digest, KEY.num_tokens)
        await backend.put(path, change(await backend.get(path)))
    finally:
        await backend.close()


def _swap_last_layers(data: bytes) -> bytes:
    """Layers 1 and 2 trade places (equal sizes): each still matches its own crc32c, not the header's list."""
    inner = _inner(data)
    return data[: -2 * len(inner[0])] + inner[2] + inner[1]


def _inner(data: bytes) -> list[bytes]:
    """Each layer's stored bytes (crc32c included) in a data object."""
    return [data[s.offset : s.end] for s in parse_head(data, SPEC.num_layers, len(data)).spans]


# ---------------------------------------------------------------------- what is valid


@pytest.mark.parametrize("codec", ["none", "lz4", "blosc-lz4"])
def test_a_valid_object_reads_back(codec: str) -> None:
    data = _object(codec)
    want = [k.tobytes() + v.tobytes() for k, v in _layers()]
    assert _load(data, codec) == want
    head = parse_head(data, SPEC.num_layers, len(data))
    assert head.contiguous()
    assert head.spans[-1].end == len(data) == head.size
    assert head.data_start == index_bytes(SPEC.num_layers) + len(head.header.to_msgpack()) + CRC_BYTES
    assert head.header == dataclasses.replace(_header(codec), layer_crcs=b"".join(x[-4:] for x in _inner(data)))
    # A reader's first range of head_bytes() holds the index and the whole header.
    assert parse_head(data[: head_bytes(SPEC.num_layers)], SPEC.num_layers, len(data)).header == head.header


def test_layers_in_another_order_are_found_by_the_index() -> None:
    inner = [
        bytes(p[0]) + bytes(p[1]) + bytes(p[2])
        for p in encode_layers(get_codec("none"), [(k.data, v.data) for k, v in _layers()], 2)
    ]
    data = _raw_object(_header(), inner, order=[0, 2, 1])
    head = parse_head(data, SPEC.num_layers, len(data))
    assert not head.contiguous()
    assert _load(data) == [k.tobytes() + v.tobytes() for k, v in _layers()]


async def test_a_store_never_misreads_layers_in_another_order(store_url: Any) -> None:
    """Writers put the layers in order; an object laid out otherwise is read right or refused as damage
    (kvstore's whole load from an object store reads it, its ranged and local reads refuse it)."""
    kv = [
        (
            torch.from_numpy(k.view(np.float16).reshape(8, 2, 4).copy()),
            torch.from_numpy(v.view(np.float16).reshape(8, 2, 4).copy()),
        )
        for k, v in _layers(1)
    ]
    opts = {"storage_options": store_url.storage_options, "chunk_tokens": 8, "repair": False}
    async with kvstore.open(store_url.url, **opts) as store:
        await store.save_prefix(SPEC, TOKENS, kv)
        await _rewrite(
            store_url, lambda data: _raw_object(parse_head(data, 3, len(data)).header, _inner(data), [0, 2, 1])
        )
        for split in (False, True):
            before = store.stats().chunks_damaged
            if split:
                async with store.load_prefix_layers(SPEC, TOKENS) as layers:
                    got = [(k, v) async for _, k, v in layers]
                    n = layers.num_tokens
            else:
                hit = await store.load_prefix(SPEC, TOKENS)
                got, n = list(hit.kv), hit.num_tokens
            if n == 0:
                assert store.stats().chunks_damaged == before + 1
                continue
            assert n == len(TOKENS)
            for (k, v), (wk, wv) in zip(got, kv, strict=True):
                assert torch.equal(k.view(torch.int16), wk.view(torch.int16))
                assert torch.equal(v.view(torch.int16), wv.view(torch.int16))


def test_header_frame_limit() -> None:
    """The header (msgpack) is at most 1024 + 4 L bytes, its frame 4 more, and a reader's first
    ``head_bytes`` = 20 L + 1032 bytes hold the index and the largest header."""
    layers = SPEC.num_layers
    limit = chunk_header_limit(layers)
    assert limit == 1024 + 4 * layers
    assert head_bytes(layers) == 20 * layers + 1032
    empty = ChunkHeader(b"k" * 32, b"p" * 32, 0, MID, 8, layers, "", b"\x00" * 4 * layers, 0.0)
    longest = "x" * (limit - len(empty.to_msgpack()) - 2)  # the str16 form: 3 bytes of header instead of 1
    inner = [b"\x00" * 8, _crc(b"\x00" * 8)]
    data = b"".join(bytes(p) for p in data_object(_header(codec=longest), [inner] * layers))
    head = parse_head(data, layers, len(data))
    assert len(head.header.to_msgpack()) == limit
    assert head.data_start == head_bytes(layers)
    with pytest.raises(IntegrityError, match="limit"):
        data_object(_header(codec=longest + "x"), [inner] * layers)


# ---------------------------------------------------------------------- what is damage, or another version


def test_every_single_byte_change_is_caught() -> None:
    """Each byte lies in a region covered by a crc32c, which detects every burst of up to 32 bits."""
    data = _object("none")
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= mask
            with pytest.raises(IntegrityError):
                _load(bytes(bad))


@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_every_truncation_is_refused(codec: str) -> None:
    data = _object(codec)
    for cut in range(len(data)):
        with pytest.raises(IntegrityError):
            parse_head(data[:cut], SPEC.num_layers, cut)
        # A reader that believed the full size but got fewer bytes: the head or a layer comes up short.
        with pytest.raises(IntegrityError):
            _read_believing(data[:cut], len(data), codec)


def test_extra_bytes_after_the_last_layer_are_ignored_like_zarr() -> None:
    """zarr reads only the ranges the index names; so does kvstore (trailing bytes are not a layer)."""
    data = _object("none")
    assert _load(data + b"\x00" * 10)


def _with_index(data: bytes, entries: Sequence[tuple[int, int]]) -> bytes:
    index = b"".join(struct.pack("<QQ", o, n) for o, n in entries)
    return index + _crc(index) + data[index_bytes(len(entries)) :]


@pytest.mark.parametrize(
    "entry",
    [
        (2**64 - 1, 2**64 - 1),  # zarr's "absent inner chunk"
        (0, 20),  # overlaps the index
        (None, 4),  # too short to hold its crc32c
        (None, 2**40),  # past the end
    ],
    ids=["absent", "over-index", "short", "past-end"],
)
def test_index_entries_outside_the_object_are_damage(entry: tuple[int | None, int]) -> None:
    data = _object("none")
    head = parse_head(data, SPEC.num_layers, len(data))
    entries = [(s.offset, s.nbytes) for s in head.spans]
    entries[1] = (entries[1][0] if entry[0] is None else entry[0], entry[1])
    with pytest.raises(IntegrityError):
        parse_head(_with_index(data, entries), SPEC.num_layers, len(data))


@pytest.mark.parametrize("first", [0, 36, 52, head_bytes(3) + 1])
def test_the_header_must_fit_between_index_and_first_layer(first: int) -> None:
    data = _object("none")
    head = parse_head(data, SPEC.num_layers, len(data))
    entries = [(first, head.spans[0].nbytes)] + [(s.offset, s.nbytes) for s in head.spans[1:]]
    with pytest.raises(IntegrityError):
        parse_head(_with_index(data, entries), SPEC.num_layers, max(len(data), first + 100))


def test_a_header_of_another_version_is_not_damage() -> None:
    body = msgpack.unpackb(_header().to_msgpack())
    body["format"] = 4
    body["layout"] = "something new"
    body["crcs"] = _crc(b"\x00" * 8) * 3
    data = _raw_object(msgpack.packb(body, use_bin_type=True), [b"\x00" * 8 + _crc(b"\x00" * 8)] * 3)
    with pytest.raises(FormatVersionError):
        parse_head(data, SPEC.num_layers, len(data))


def test_an_unknown_codec_is_another_version() -> None:
    data = _object("none")
    head = parse_head(data, SPEC.num_layers, len(data))
    renamed = ShardHead(_header(codec="zstd"), head.spans, head.size)
    with pytest.raises(FormatVersionError):
        check_chunk_head(renamed, SPEC, MID, KEY, "none")


@pytest.mark.parametrize("store_codec", ["none", "lz4", "blosc-lz4"])
@pytest.mark.parametrize("codec", ["none", "lz4", "blosc-lz4"])
def test_a_known_codec_other_than_the_stores_is_damage(codec: str, store_codec: str) -> None:
    """Every chunk of a store has the store's codec (the one its array's zarr.json names): another known codec
    in a header is damage, not another version."""
    data = _object(codec)
    head = parse_head(data, SPEC.num_layers, len(data))
    if codec == store_codec:
        assert check_chunk_head(head, SPEC, MID, KEY, store_codec).name == codec
    else:
        with pytest.raises(IntegrityError, match="codec"):
            check_chunk_head(head, SPEC, MID, KEY, store_codec)


@pytest.mark.parametrize(
    "change",
    [
        {"key": b"\x01" * 32},
        {"parent": b"\x01" * 32},
        {"index": 1},
        {"model_id": b"\x01" * 16},
        {"num_tokens": 7},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_header_naming_another_chunk_is_damage(change: dict[str, Any]) -> None:
    data = _object("none", **change)
    head = parse_head(data, SPEC.num_layers, len(data))
    with pytest.raises(IntegrityError, match=r"another chunk|does not match"):
        check_chunk_head(head, SPEC, MID, KEY, "none")


def test_a_header_with_another_layer_count_is_damage() -> None:
    data = _object("none", num_layers=4)
    with pytest.raises(IntegrityError, match="layer"):
        parse_head(data, SPEC.num_layers, len(data))


def test_an_uncompressed_layer_of_the_wrong_size_is_damage() -> None:
    layer = b"\x00" * (RAW - 2)
    data = _raw_object(_header(), [layer + _crc(layer)] * 3)
    head = parse_head(data, SPEC.num_layers, len(data))
    with pytest.raises(IntegrityError, match="size"):
        check_chunk_head(head, SPEC, MID, KEY, "none")


@pytest.mark.parametrize("verify", [True, False])
def test_a_sound_layer_in_the_wrong_place_is_damage_even_without_verify(verify: bool) -> None:
    """Swapped layers, or a layer of another chunk, carry crc32cs that match their own bytes but not the
    header's list: damage even for a reader that does not recompute checksums."""
    data = _object("none")
    inner = _inner(data)
    swapped = _swap_last_layers(data)
    foreign = data[: -len(inner[0])] + _inner(_object("none", seed=7))[2]
    for bad in (swapped, foreign):
        assert len(bad) == len(data)
        with pytest.raises(IntegrityError, match="header"):
            _load(bad, verify=verify)


async def test_a_store_without_verify_still_refuses_a_misplaced_layer(store_url: Any) -> None:
    kv = [(torch.randn(8, 2, 4).half(), torch.randn(8, 2, 4).half()) for _ in range(SPEC.num_layers)]
    opts = {"storage_options": store_url.storage_options, "chunk_tokens": 8, "verify": False, "repair": False}
    async with kvstore.open(store_url.url, **opts) as store:
        await store.save_prefix(SPEC, TOKENS, kv)
        await _rewrite(store_url, _swap_last_layers)
        hit = await store.load_prefix(SPEC, TOKENS)
        assert (hit.num_tokens, hit.chunks_damaged) == (0, 1)
        async with store.load_prefix_layers(SPEC, TOKENS) as layers:
            assert [n async for n, _, _ in layers] == [] or layers.num_tokens == 0


# ---------------------------------------------------------------------- fuzzing


def _parse_and_read(data: bytes, size: int) -> None:
    """What a reader does with untrusted bytes; only kvstore's own errors may come out."""
    with contextlib.suppress(IntegrityError, FormatVersionError):
        head = parse_head(data, SPEC.num_layers, size)
        assert len(head.spans) == SPEC.num_layers
        assert head.header.num_layers == SPEC.num_layers
        for span in head.spans:
            assert head.data_start <= span.offset
            assert span.nbytes > CRC_BYTES
            assert span.end <= size
        codec = check_chunk_head(head, SPEC, MID, KEY, head.header.codec).name  # the store's codec: tested apart
        if size == len(data):
            _read_all(data, head, codec)


@SETTINGS
@given(data=st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _parse_and_read(data, len(data))


@SETTINGS
@given(
    codec=st.sampled_from(["none", "lz4", "blosc-lz4"]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
    splice=st.binary(max_size=40),
    at=st.integers(0, 10**6),
    cut=st.integers(0, 10**6),
)
def test_damaged_valid_objects(codec: str, flips: list[tuple[int, int]], splice: bytes, at: int, cut: int) -> None:
    data = bytearray(_object(codec))
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    at %= len(data)
    data[at : at + len(splice)] = splice
    _parse_and_read(bytes(data), len(data))
    _parse_and_read(bytes(data[: cut % (len(data) + 1)]), len(data))


@SETTINGS
@given(
    entries=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=3, max_size=3),
    size=st.integers(0, 2**40),
)
def test_hostile_index_with_a_valid_checksum(entries: list[tuple[int, int]], size: int) -> None:
    """An index whose crc32c matches (a writer's bug, not bit rot) must still stay inside the object."""
    data = _with_index(_object("none"), entries)
    _parse_and_read(data, min(size, len(data)))
    _parse_and_read(data, len(data))
