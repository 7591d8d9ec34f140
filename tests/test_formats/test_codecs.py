"""Layer-object codecs: round trips, the documented containers, and refusal of damaged or hostile data.

A decoder gets the expected decoded size from the caller (it comes from the model
spec, never from the object), checks headers against it before allocating, and
raises IntegrityError for anything it cannot decode to exactly that size.
"""

from __future__ import annotations

import struct
import tracemalloc

import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numcodecs import Blosc

from kvstore import FormatVersionError, IntegrityError, InvalidInputError
from kvstore.formats.codecs import CODEC_NAMES, DEFAULT_CODEC, Codec, get_codec

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODECS = ["none", "lz4", "blosc-lz4"]


def _kv_bytes(itemsize: int, n_items: int, seed: int = 0) -> tuple[bytes, bytes]:
    """K and V halves of a layer: float-like data of the given width."""
    rng = np.random.default_rng(seed)
    dtype = {1: np.int8, 2: np.float16, 4: np.float32}[itemsize]
    if itemsize == 1:
        k, v = rng.integers(-128, 128, n_items, dtype=np.int8), rng.integers(-128, 128, n_items, dtype=np.int8)
    else:
        k, v = rng.standard_normal(n_items).astype(dtype), rng.standard_normal(n_items).astype(dtype)
    return k.tobytes(), v.tobytes()


def _encode(codec: Codec, k: bytes, v: bytes, itemsize: int) -> bytes:
    return codec.encode([memoryview(k), memoryview(v)], itemsize)


def test_codec_names() -> None:
    assert CODEC_NAMES == ("none", "lz4", "blosc-lz4")
    assert DEFAULT_CODEC == "none"
    for name in CODECS:
        assert get_codec(name).name == name


def test_unknown_codec_is_bad_input_or_a_newer_format() -> None:
    with pytest.raises(InvalidInputError):
        get_codec("zstd")
    with pytest.raises(FormatVersionError):
        get_codec("zstd", stored=True)


@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_zarr_codec_chains_are_the_documented_ones(itemsize: int) -> None:
    raw = {"name": "bytes", "configuration": {"endian": "little"}}
    assert get_codec("none").zarr_codecs(itemsize) == [raw]
    assert get_codec("lz4").zarr_codecs(itemsize) == [
        raw,
        {"name": "numcodecs.lz4", "configuration": {"acceleration": 1}},
    ]
    assert get_codec("blosc-lz4").zarr_codecs(itemsize) == [
        raw,
        {
            "name": "blosc",
            "configuration": {
                "typesize": itemsize,
                "cname": "lz4",
                "clevel": 5,
                "shuffle": "bitshuffle",
                "blocksize": 0,
            },
        },
    ]


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("itemsize", [1, 2, 4])
@pytest.mark.parametrize("n_items", [1, 7, 256, 2 * 16 * 2 * 8, 64 * 1024])
def test_round_trip(name: str, itemsize: int, n_items: int) -> None:
    codec = get_codec(name)
    k, v = _kv_bytes(itemsize, n_items)
    encoded = _encode(codec, k, v, itemsize)
    decoded = codec.decode(encoded, len(k) + len(v))
    assert bytes(decoded) == k + v
    # Any buffer type is accepted.
    assert bytes(codec.decode(bytearray(encoded), len(k) + len(v))) == k + v
    assert bytes(codec.decode(memoryview(encoded), len(k) + len(v))) == k + v


@SETTINGS
@given(name=st.sampled_from(CODECS), itemsize=st.sampled_from([1, 2, 4]), data=st.data())
def test_round_trip_of_arbitrary_bytes(name: str, itemsize: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 600), label="items")
    k = data.draw(st.binary(min_size=n * itemsize, max_size=n * itemsize), label="K")
    v = data.draw(st.binary(min_size=n * itemsize, max_size=n * itemsize), label="V")
    codec = get_codec(name)
    assert bytes(codec.decode(_encode(codec, k, v, itemsize), 2 * n * itemsize)) == k + v


def test_constant_data_actually_compresses() -> None:
    k = v = bytes(64 * 1024)
    for name in ("lz4", "blosc-lz4"):
        assert len(_encode(get_codec(name), k, v, 2)) < len(k) // 10


def test_lz4_is_a_size_prefixed_lz4_block() -> None:
    k, v = _kv_bytes(2, 4096)
    encoded = _encode(get_codec("lz4"), k, v, 2)
    assert struct.unpack("<I", encoded[:4])[0] == len(k) + len(v)
    assert lz4.block.decompress(encoded[4:], uncompressed_size=len(k) + len(v)) == k + v
    # What numcodecs' LZ4 codec (zarr's numcodecs.lz4) produces is readable too.
    from numcodecs import LZ4

    theirs = LZ4(acceleration=1).encode(np.frombuffer(k + v, np.uint8))
    assert bytes(get_codec("lz4").decode(theirs, len(k) + len(v))) == k + v


@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_blosc_is_bitshuffled_lz4(itemsize: int) -> None:
    k, v = _kv_bytes(itemsize, 8192)
    encoded = _encode(get_codec("blosc-lz4"), k, v, itemsize)
    version, _versionlz, flags, typesize, nbytes, _blocksize, cbytes = struct.unpack("<BBBBIII", encoded[:16])
    assert version == 2
    assert typesize == itemsize
    assert nbytes == len(k) + len(v)
    assert cbytes == len(encoded)
    assert flags >> 5 == 1  # compressor code 1: lz4
    if not flags & 0x02:  # not stored uncompressed ("memcpyed")
        assert flags & 0x04  # bit-shuffle
    assert Blosc().decode(encoded) == k + v
    theirs = Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE, typesize=itemsize).encode(
        np.frombuffer(k + v, dtype=f"u{itemsize}")
    )
    assert bytes(get_codec("blosc-lz4").decode(theirs, len(k) + len(v))) == k + v


# Decoder vectors of docs/FORMAT.md ("chunk-tiny"): (decoded, lz4, blosc-lz4), the inner chunks without their crc32c.
TINY = [
    (
        "0000003c00498049008000bc00c980c9",
        "10000000f0010000003c00498049008000bc00c980c9",
        "020136021000000010000000200000000000003c00498049008000bc00c980c9",
    ),
    (
        "40565056e056f05640d650d6e0d6f0d6",
        "10000000f00140565056e056f05640d650d6e0d6f0d6",
        "0201360210000000100000002000000040565056e056f05640d650d6e0d6f0d6",
    ),
    ("004d404d00cd40cd", "0800000080004d404d00cd40cd", "02013602080000000800000018000000004d404d00cd40cd"),
    ("8057905780d790d7", "08000000808057905780d790d7", "020136020800000008000000180000008057905780d790d7"),
]


@pytest.mark.parametrize(("decoded", "lz4_hex", "blosc_hex"), TINY)
def test_documented_decoder_vectors(decoded: str, lz4_hex: str, blosc_hex: str) -> None:
    raw = bytes.fromhex(decoded)
    half = len(raw) // 2
    assert bytes(get_codec("none").decode(raw, len(raw))) == raw
    assert bytes(get_codec("lz4").decode(bytes.fromhex(lz4_hex), len(raw))) == raw
    assert bytes(get_codec("blosc-lz4").decode(bytes.fromhex(blosc_hex), len(raw))) == raw
    # This library's encoders produce exactly these bytes (other encoders need not).
    parts = [memoryview(raw[:half]), memoryview(raw[half:])]
    assert get_codec("none").encode(parts, 2) == raw
    assert get_codec("lz4").encode(parts, 2).hex() == lz4_hex
    assert get_codec("blosc-lz4").encode(parts, 2).hex() == blosc_hex


# ---------------------------------------------------------------------- damaged data


@pytest.mark.parametrize("name", CODECS)
def test_every_truncation_is_refused(name: str) -> None:
    codec = get_codec(name)
    k, v = _kv_bytes(2, 300)
    encoded = _encode(codec, k, v, 2)
    for cut in range(len(encoded)):
        with pytest.raises(IntegrityError):
            codec.decode(encoded[:cut], len(k) + len(v))


@pytest.mark.parametrize("name", CODECS)
def test_extra_bytes_are_refused(name: str) -> None:
    codec = get_codec(name)
    k, v = _kv_bytes(2, 300)
    encoded = _encode(codec, k, v, 2)
    for extra in (b"\x00", b"\x00" * 17, encoded):
        with pytest.raises(IntegrityError):
            codec.decode(encoded + extra, len(k) + len(v))


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("delta", [-2, -1, 1, 2])
def test_wrong_expected_size_is_refused(name: str, delta: int) -> None:
    codec = get_codec(name)
    k, v = _kv_bytes(2, 300)
    with pytest.raises(IntegrityError):
        codec.decode(_encode(codec, k, v, 2), len(k) + len(v) + delta)


@SETTINGS
@given(
    name=st.sampled_from(CODECS),
    seed=st.integers(0, 3),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4),
)
def test_corrupted_objects_fail_or_keep_their_size(name: str, seed: int, flips: list[tuple[int, int]]) -> None:
    """Bit flips: the decoder raises IntegrityError or returns exactly the expected size.

    LZ4 blocks and Blosc buffers carry no checksum, so a flip may decode to other
    bytes of the right size: the layer's crc32c in the data object catches that first.
    """
    codec = get_codec(name)
    k, v = _kv_bytes(2, 512, seed)
    data = bytearray(_encode(codec, k, v, 2))
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    try:
        out = codec.decode(bytes(data), len(k) + len(v))
    except IntegrityError:
        return
    assert len(out) == len(k) + len(v)


@SETTINGS
@given(name=st.sampled_from(CODECS), garbage=st.binary(max_size=2048), nbytes=st.integers(1, 4096))
def test_garbage_fails_or_keeps_its_size(name: str, garbage: bytes, nbytes: int) -> None:
    codec = get_codec(name)
    try:
        out = codec.decode(garbage, nbytes)
    except IntegrityError:
        return
    assert len(out) == nbytes


@SETTINGS
@given(header=st.binary(min_size=16, max_size=16), body=st.binary(max_size=256), nbytes=st.integers(1, 1024))
def test_blosc_with_arbitrary_but_size_consistent_header(header: bytes, body: bytes, nbytes: int) -> None:
    """Headers whose sizes pass the checks, with every other header byte arbitrary."""
    data = bytearray(header + body)
    data[4:8] = struct.pack("<I", nbytes)
    data[12:16] = struct.pack("<I", len(data))
    try:
        out = get_codec("blosc-lz4").decode(bytes(data), nbytes)
    except IntegrityError:
        return
    assert len(out) == nbytes


def _peak_during(fn: object, *args: object) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(IntegrityError):
            fn(*args)  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HUGE = 2**31 - 1


@pytest.mark.parametrize("claim", [HUGE, 2**32 - 1, 1 << 30])
def test_lz4_header_claiming_a_huge_size_allocates_nothing(claim: int) -> None:
    k, v = _kv_bytes(2, 2048)
    encoded = bytearray(_encode(get_codec("lz4"), k, v, 2))
    encoded[:4] = struct.pack("<I", claim)
    peak = _peak_during(get_codec("lz4").decode, bytes(encoded), len(k) + len(v))
    assert peak < 1 << 20, f"decoding allocated {peak} bytes for a header claiming {claim}"


@pytest.mark.parametrize("field", ["nbytes", "cbytes", "both"])
@pytest.mark.parametrize("claim", [HUGE, 2**32 - 1, 1 << 30])
def test_blosc_header_claiming_a_huge_size_allocates_nothing(field: str, claim: int) -> None:
    k, v = _kv_bytes(2, 2048)
    encoded = bytearray(_encode(get_codec("blosc-lz4"), k, v, 2))
    if field in ("nbytes", "both"):
        encoded[4:8] = struct.pack("<I", claim)
    if field in ("cbytes", "both"):
        encoded[12:16] = struct.pack("<I", claim)
    peak = _peak_during(get_codec("blosc-lz4").decode, bytes(encoded), len(k) + len(v))
    assert peak < 1 << 20, f"decoding allocated {peak} bytes for a header claiming {claim}"


@pytest.mark.parametrize("blocksize", [0, 1, 16, 8193, HUGE, 2**32 - 1])
def test_blosc_hostile_blocksize(blocksize: int) -> None:
    k, v = _kv_bytes(2, 2048)
    encoded = bytearray(_encode(get_codec("blosc-lz4"), k, v, 2))
    encoded[8:12] = struct.pack("<I", blocksize)
    try:
        out = get_codec("blosc-lz4").decode(bytes(encoded), len(k) + len(v))
    except IntegrityError:
        return
    assert len(out) == len(k) + len(v)


def test_none_refuses_a_huge_object_without_copying() -> None:
    data = bytes(1 << 22)
    peak = _peak_during(get_codec("none").decode, data, 1024)
    assert peak < 1 << 20
