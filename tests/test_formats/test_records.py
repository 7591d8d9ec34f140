"""Records: round trips, golden bytes (docs/FORMAT.md), and defensive parsing of hostile input.

Whatever bytes a store hands back, ``from_msgpack`` may only succeed or raise
IntegrityError / FormatVersionError: a damaged record must never crash a reader.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvstore import FormatVersionError, IntegrityError, ModelSpec
from kvstore.formats.keys import model_id
from kvstore.formats.records import (
    STORE_MAGIC,
    ChunkHeader,
    ModelRecord,
    RetirementRecord,
    RootRecord,
    chunk_header_limit,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RECORDS = (RootRecord, ModelRecord, ChunkHeader, RetirementRecord)
SMALL_LIMIT = 64 * 1024
HEADER_LIMIT = 1024 + 4 * 65536  # a chunk header of the most layers a model may have

# ---------------------------------------------------------------------- golden bytes (docs/FORMAT.md)

ROOT_BYTES = bytes.fromhex(
    "85a6666f726d617403a56d61676963a76b7673746f7265ac6368756e6b5f746f6b656e7310a5636f646563a46e6f6e65a7637265617465"
    "64cb41d954fc40000000"
)
MODEL_SPEC = ModelSpec("Qwen2.5/日本語-ü", "2024-09 β", 80, 8, 128, torch.float8_e4m3fn)
MODEL_ID = bytes.fromhex("482f55dc4f348e3403f32e92a1684471")
MODEL_BYTES = bytes.fromhex(
    "89a6666f726d617403a26964c410482f55dc4f348e3403f32e92a1684471a46e616d65b45177656e322e352fe697a5e69cace8aa9e2d"
    "c3bca776657273696f6eaa323032342d303920ceb2aa6e756d5f6c617965727350ac6e756d5f6b765f686561647308a8686561645f"
    "64696dcc80a56474797065ad666c6f6174385f65346d33666ea763726561746564cb41d954fc40200000"
)
# The header of the tail chunk of the "chunk-tiny" vector, codec none.
HEADER = ChunkHeader(
    key=bytes.fromhex("6bba8b6af75e900843204552ec4d35cafde3cd2cc2db51a84c0ff9120f2383e8"),
    parent=bytes.fromhex("2edf970ed8f2beef9df051679762fb2708b8d5364f32cfa1c606ba614bb6d9f8"),
    index=1,
    model_id=bytes.fromhex("2cc2d5c9f1ed6e4ea8fc086562f95e60"),
    num_tokens=1,
    num_layers=2,
    codec="none",
    layer_crcs=bytes.fromhex("5a19099d14428e56"),
    created=1700000000.0,
)
HEADER_BYTES = bytes.fromhex(
    "8aa6666f726d617403a36b6579c4206bba8b6af75e900843204552ec4d35cafde3cd2cc2db51a84c0ff9120f2383e8a6706172656e74"
    "c4202edf970ed8f2beef9df051679762fb2708b8d5364f32cfa1c606ba614bb6d9f8a5696e64657801a56d6f64656cc4102cc2d5c9f1"
    "ed6e4ea8fc086562f95e60a6746f6b656e7301a66c617965727302a5636f646563a46e6f6e65a463726373c4085a19099d14428e56a7"
    "63726561746564cb41d954fc40000000"
)
RETIREMENT = RetirementRecord(MODEL_ID, retired_by="alice@host", reason="bad weights", retired_at=1700000000.0)
RETIREMENT_BYTES = RETIREMENT.to_msgpack()


def test_root_record_golden_bytes() -> None:
    assert RootRecord(chunk_tokens=16, codec="none", created=1700000000.0).to_msgpack() == ROOT_BYTES
    assert RootRecord.from_msgpack(ROOT_BYTES) == RootRecord(16, "none", 1700000000.0)
    assert msgpack.unpackb(ROOT_BYTES) == {
        "format": 3,
        "magic": "kvstore",
        "chunk_tokens": 16,
        "codec": "none",
        "created": 1700000000.0,
    }
    assert list(msgpack.unpackb(ROOT_BYTES)) == ["format", "magic", "chunk_tokens", "codec", "created"]


def test_model_record_golden_bytes() -> None:
    assert model_id(MODEL_SPEC) == MODEL_ID
    assert ModelRecord(MODEL_ID, MODEL_SPEC, 1700000000.5).to_msgpack() == MODEL_BYTES
    assert ModelRecord.from_msgpack(MODEL_BYTES) == ModelRecord(MODEL_ID, MODEL_SPEC, 1700000000.5)
    assert list(msgpack.unpackb(MODEL_BYTES)) == [
        "format",
        "id",
        "name",
        "version",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "dtype",
        "created",
    ]


def test_chunk_header_golden_bytes() -> None:
    assert HEADER.to_msgpack() == HEADER_BYTES
    assert ChunkHeader.from_msgpack(HEADER_BYTES) == HEADER
    assert list(msgpack.unpackb(HEADER_BYTES)) == [
        "format",
        "key",
        "parent",
        "index",
        "model",
        "tokens",
        "layers",
        "codec",
        "crcs",
        "created",
    ]


def test_readers_accept_any_field_order_and_ignore_unknown_fields() -> None:
    pairs = ((RootRecord, ROOT_BYTES), (ModelRecord, MODEL_BYTES), (ChunkHeader, HEADER_BYTES))
    for cls, data in (*pairs, (RetirementRecord, RETIREMENT_BYTES)):
        obj = msgpack.unpackb(data)
        shuffled = dict(reversed(list(obj.items())))
        shuffled["a-field-from-the-future"] = {"x": [1, 2.5, b"\x00"]}
        assert cls.from_msgpack(msgpack.packb(shuffled, use_bin_type=True)) == cls.from_msgpack(data)


def test_integer_created_is_accepted() -> None:
    obj = msgpack.unpackb(ROOT_BYTES)
    obj["created"] = 1700000000
    assert RootRecord.from_msgpack(msgpack.packb(obj)).created == 1700000000.0


# ---------------------------------------------------------------------- round trips

finite = st.floats(allow_nan=False, allow_infinity=False)
utf8_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=100)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
specs = st.builds(
    ModelSpec,
    name=utf8_names,
    version=utf8_names,
    num_layers=st.integers(1, 4096),
    num_kv_heads=st.integers(1, 2**31 - 1),
    head_dim=st.integers(1, 2**31 - 1),
    dtype=dtypes,
)
digests32 = st.binary(min_size=32, max_size=32)


@SETTINGS
@given(chunk_tokens=st.integers(1, 2**24), codec=st.sampled_from(["none", "lz4", "blosc-lz4"]), created=finite)
def test_root_record_round_trip(chunk_tokens: int, codec: str, created: float) -> None:
    rec = RootRecord(chunk_tokens, codec, created)
    assert RootRecord.from_msgpack(rec.to_msgpack()) == rec


@SETTINGS
@given(spec=specs, created=finite)
def test_model_record_round_trip(spec: ModelSpec, created: float) -> None:
    rec = ModelRecord(model_id(spec), spec, created)
    back = ModelRecord.from_msgpack(rec.to_msgpack())
    assert back == rec
    assert back.spec.dtype == spec.dtype


@st.composite
def headers(draw: st.DrawFn) -> ChunkHeader:
    layers = draw(st.integers(1, 64) | st.sampled_from([2**16]))
    return ChunkHeader(
        key=draw(digests32),
        parent=draw(digests32),
        index=draw(st.integers(0, 2**40)),
        model_id=draw(st.binary(min_size=16, max_size=16)),
        num_tokens=draw(st.integers(1, 2**24)),
        num_layers=layers,
        codec=draw(st.sampled_from(["none", "lz4", "blosc-lz4"]) | st.text(max_size=40)),
        layer_crcs=draw(st.binary(min_size=4 * layers, max_size=4 * layers)),
        created=draw(finite),
    )


@SETTINGS
@given(rec=headers())
def test_chunk_header_round_trip(rec: ChunkHeader) -> None:
    assert ChunkHeader.from_msgpack(rec.to_msgpack()) == rec


@SETTINGS
@given(
    mid=st.binary(min_size=16, max_size=16),
    by=st.text(max_size=300),
    reason=st.none() | st.text(max_size=300),
    at=finite,
)
def test_retirement_record_round_trip(mid: bytes, by: str, reason: str | None, at: float) -> None:
    rec = RetirementRecord(mid, retired_by=by, reason=reason, retired_at=at)
    assert RetirementRecord.from_msgpack(rec.to_msgpack()) == rec
    assert msgpack.unpackb(rec.to_msgpack())["format"] == 3


def test_every_accepted_model_spec_has_a_readable_model_record() -> None:
    """The layer counts ModelSpec accepts must survive the model record (or ModelSpec must refuse them)."""
    for layers in (65536, 65537, 2**31 - 1):
        try:
            spec = ModelSpec("big", "v1", layers, 1, 1, torch.float16)
        except ValueError:
            continue  # refusing such a spec up front is also consistent
        rec = ModelRecord(model_id(spec), spec, 0.0)
        assert ModelRecord.from_msgpack(rec.to_msgpack()) == rec, f"{layers} layers"
    spec = ModelSpec("wide", "v1", 1, 2**31 - 1, 2**31 - 1, torch.float16)
    rec = ModelRecord(model_id(spec), spec, 0.0)
    assert ModelRecord.from_msgpack(rec.to_msgpack()) == rec


def test_the_largest_chunk_header_fits_its_size_limit() -> None:
    """Every field at its widest (and a long codec name from a newer writer) stays under the limit."""
    for layers in (1, 64, 2**16):
        rec = ChunkHeader(
            key=b"k" * 32,
            parent=b"p" * 32,
            index=2**40,
            model_id=b"m" * 16,
            num_tokens=2**24,
            num_layers=layers,
            codec="x" * 512,
            layer_crcs=b"\xff" * 4 * layers,
            created=-1.5e308,
        )
        assert len(rec.to_msgpack()) <= chunk_header_limit(layers)
        assert ChunkHeader.from_msgpack(rec.to_msgpack()) == rec
    assert chunk_header_limit(2**16) == HEADER_LIMIT


# ---------------------------------------------------------------------- versions and limits


def _valid_obj(cls: type) -> dict[str, Any]:
    data = {
        RootRecord: ROOT_BYTES,
        ModelRecord: MODEL_BYTES,
        ChunkHeader: HEADER_BYTES,
        RetirementRecord: RETIREMENT_BYTES,
    }[cls]
    obj: dict[str, Any] = msgpack.unpackb(data)
    return obj


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("version", [0, 1, 2, 4, 255, 2**32, 2**64 - 1])
def test_unknown_format_version(cls: type, version: int) -> None:
    obj = _valid_obj(cls)
    obj["format"] = version
    with pytest.raises(FormatVersionError):
        cls.from_msgpack(msgpack.packb(obj))
    # The version is checked before anything else: a newer format may change every other field.
    with pytest.raises(FormatVersionError):
        cls.from_msgpack(msgpack.packb({"format": version, "magic": 1}))


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("version", [None, "3", 3.0, True, [3], b"\x03"], ids=repr)
def test_missing_or_malformed_format_version_is_damage(cls: type, version: object) -> None:
    obj = _valid_obj(cls)
    if version is None:
        del obj["format"]
    else:
        obj["format"] = version
    with pytest.raises(IntegrityError):
        cls.from_msgpack(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    ("cls", "limit"), [(RootRecord, SMALL_LIMIT), (ModelRecord, SMALL_LIMIT), (ChunkHeader, HEADER_LIMIT)]
)
def test_oversize_records_are_rejected(cls: type, limit: int) -> None:
    obj = _valid_obj(cls)
    base = len(msgpack.packb({**obj, "pad": b""}, use_bin_type=True))

    def padded(total: int) -> bytes:
        pad = total - base
        for header in (2, 3, 5):  # bin8 / bin16 / bin32 header sizes
            data = msgpack.packb({**obj, "pad": b"\x00" * (pad - header + 2)}, use_bin_type=True)
            if len(data) == total:
                return data
        raise AssertionError("could not pad to the exact size")

    at_limit = padded(limit)
    assert len(at_limit) == limit
    assert cls.from_msgpack(at_limit) == cls.from_msgpack(msgpack.packb(obj, use_bin_type=True))
    with pytest.raises(IntegrityError):
        cls.from_msgpack(padded(limit + 1))
    # Checked before parsing: a huge blob of garbage is refused for its size alone.
    with pytest.raises(IntegrityError, match="limit"):
        cls.from_msgpack(b"\xc1" * (limit + 1))


def test_root_record_magic() -> None:
    obj = _valid_obj(RootRecord)
    assert obj["magic"] == STORE_MAGIC == "kvstore"
    for magic in ("zarr", "", None, b"kvstore", 1):
        bad = dict(obj)
        if magic is None:
            del bad["magic"]
        else:
            bad["magic"] = magic
        with pytest.raises(IntegrityError):
            RootRecord.from_msgpack(msgpack.packb(bad, use_bin_type=True))


@pytest.mark.parametrize(
    ("field", "value"),
    [("head_dim", 129), ("num_kv_heads", 9), ("num_layers", 81), ("name", "Qwen2.5/日本語-u"), ("dtype", "bfloat16")],
)
def test_model_record_whose_id_does_not_match_its_spec_is_damage(field: str, value: object) -> None:
    """A parseable but altered spec (one flipped bit in head_dim) must not pass for the model.

    The GC derives each live model's chain root from its record's spec: a spec that
    no longer hashes to the record's id would make every chunk of the model look
    unreachable, and be deleted.
    """
    obj = _valid_obj(ModelRecord)
    obj[field] = value
    with pytest.raises(IntegrityError):
        ModelRecord.from_msgpack(msgpack.packb(obj, use_bin_type=True))


def test_model_record_with_unknown_dtype_is_a_newer_format() -> None:
    obj = _valid_obj(ModelRecord)
    obj["dtype"] = "float4_e2m1"
    with pytest.raises(FormatVersionError):
        ModelRecord.from_msgpack(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize("old", [1, 2])
def test_a_root_record_of_an_older_version_is_refused_naming_both_versions(old: int) -> None:
    """Version 1 and 2 stores are refused at open (FORMAT.md section 11): the message names both versions."""
    fields: dict[str, Any] = {"format": old, "magic": "kvstore", "chunk_tokens": 256, "created": 1700000000.0}
    with pytest.raises(FormatVersionError, match=rf"format version {old}\b.*format version 3\b"):
        RootRecord.from_msgpack(msgpack.packb(fields))


@pytest.mark.parametrize("codec", ["none", "lz4", "blosc-lz4"])
def test_root_record_codec(codec: str) -> None:
    obj = _valid_obj(RootRecord)
    obj["codec"] = codec
    assert RootRecord.from_msgpack(msgpack.packb(obj, use_bin_type=True)).codec == codec


@pytest.mark.parametrize("codec", ["zstd", "", "NONE", "lz4 "])
def test_root_record_naming_an_unknown_codec_is_a_newer_format(codec: str) -> None:
    """A store created with a codec this kvstore does not know is refused, not read as damage."""
    obj = _valid_obj(RootRecord)
    obj["codec"] = codec
    with pytest.raises(FormatVersionError, match="codec"):
        RootRecord.from_msgpack(msgpack.packb(obj, use_bin_type=True))


# Field values that a reader must refuse as damage, per record.
BAD_FIELDS: list[tuple[type, str, object]] = [
    (RootRecord, "chunk_tokens", 0),
    (RootRecord, "chunk_tokens", 2**24 + 1),
    (RootRecord, "chunk_tokens", True),
    (RootRecord, "chunk_tokens", 16.0),
    (RootRecord, "chunk_tokens", "16"),
    (RootRecord, "codec", 0),
    (RootRecord, "codec", b"none"),
    (RootRecord, "codec", None),
    (RootRecord, "created", "yesterday"),
    (RootRecord, "created", True),
    (ModelRecord, "id", b"\x00" * 15),
    (ModelRecord, "id", b"\x00" * 32),
    (ModelRecord, "id", "482f55dc4f348e3403f32e92a1684471"),
    (ModelRecord, "name", ""),
    (ModelRecord, "name", b"name"),
    (ModelRecord, "name", "x" * 1025),
    (ModelRecord, "version", ""),
    (ModelRecord, "num_layers", 0),
    (ModelRecord, "num_layers", True),
    (ModelRecord, "num_kv_heads", 0),
    (ModelRecord, "num_kv_heads", 2**31),
    (ModelRecord, "head_dim", 2**31),
    (ModelRecord, "head_dim", 1.5),
    (ModelRecord, "dtype", 3),
    (ChunkHeader, "key", b"\x00" * 31),
    (ChunkHeader, "key", "00" * 32),
    (ChunkHeader, "parent", b"\x00" * 33),
    (ChunkHeader, "model", b"\x00" * 32),
    (ChunkHeader, "index", -1),
    (ChunkHeader, "index", 2**40 + 1),
    (ChunkHeader, "index", False),
    (ChunkHeader, "tokens", 0),
    (ChunkHeader, "tokens", 2**24 + 1),
    (ChunkHeader, "layers", 0),
    (ChunkHeader, "layers", 2**16 + 1),
    (ChunkHeader, "layers", True),
    (ChunkHeader, "layers", [8, 8]),
    (ChunkHeader, "codec", 0),
    (ChunkHeader, "codec", b"none"),
    (ChunkHeader, "crcs", b""),
    (ChunkHeader, "crcs", b"\x00" * 7),
    (ChunkHeader, "crcs", b"\x00" * 12),
    (ChunkHeader, "crcs", "5a19099d14428e56"),
    (ChunkHeader, "crcs", [0x5A19099D, 0x14428E56]),
    (ChunkHeader, "created", None),
    (RetirementRecord, "id", b"\x00" * 15),
    (RetirementRecord, "retired_by", None),
    (RetirementRecord, "retired_by", "x" * 4097),
    (RetirementRecord, "retired_at", "now"),
    # Non-finite timestamps (found by fuzz/fuzz_records.py): NaN never compares with a GC cut-off.
    (RootRecord, "created", float("nan")),
    (ModelRecord, "created", float("inf")),
    (ChunkHeader, "created", float("-inf")),
    (RetirementRecord, "retired_at", float("nan")),
]


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [pytest.param(c, f, v, id=f"{c.__name__}-{f}-{v!r:.24}") for c, f, v in BAD_FIELDS],
)
def test_bad_field_values_are_damage(cls: type, field: str, value: object) -> None:
    obj = _valid_obj(cls)
    obj[field] = value
    with pytest.raises(IntegrityError):
        cls.from_msgpack(msgpack.packb(obj, use_bin_type=True))
    del obj[field]
    with pytest.raises(IntegrityError):
        cls.from_msgpack(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\xc1",
        b"\x80",
        b"\x90",
        msgpack.packb([1, 2, 3]),
        msgpack.packb("kvstore"),
        msgpack.packb({1: 2}),
        msgpack.packb({(1, 2): 1}),
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion entries
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\x91" * 5000 + b"\x00",  # nested arrays deeper than any sane limit
        b"\xd4\xff\x00",  # ext -1: a malformed timestamp
        ROOT_BYTES[:-1],
        MODEL_BYTES[:-3],
        HEADER_BYTES[:40],
        ROOT_BYTES + b"\x00",  # trailing bytes
    ],
    ids=lambda d: d[:12].hex() + f"..{len(d)}",
)
def test_malformed_bytes_are_damage(cls: type, data: bytes) -> None:
    with pytest.raises(IntegrityError):
        cls.from_msgpack(data)


# ---------------------------------------------------------------------- fuzzing


def _parse_only_raises_kvstore_errors(cls: type, data: bytes) -> None:
    with contextlib.suppress(IntegrityError, FormatVersionError):
        cls.from_msgpack(data)


@SETTINGS
@given(data=st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    for cls in RECORDS:
        _parse_only_raises_kvstore_errors(cls, data)


@SETTINGS
@given(data=st.binary(min_size=1, max_size=64), cut=st.integers(0, 400), which=st.integers(0, 3))
def test_valid_records_with_spliced_garbage(data: bytes, cut: int, which: int) -> None:
    good = (ROOT_BYTES, MODEL_BYTES, HEADER_BYTES, RETIREMENT_BYTES)[which]
    cut = min(cut, len(good))
    for cls in RECORDS:
        _parse_only_raises_kvstore_errors(cls, good[:cut] + data + good[cut + len(data) :])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@SETTINGS
@given(obj=msgpack_values)
def test_random_msgpack_structures(obj: object) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    for cls in RECORDS:
        _parse_only_raises_kvstore_errors(cls, data)


edge_values = st.sampled_from(
    ["", "x" * 1025, 0, -1, 1, 2**24 + 1, 2**31 - 1, 2**31, 2**40, 2**64 - 1, True, None, 1.5, b"", b"\x00" * 16, []]
)


@SETTINGS
@example(which=ModelRecord, changes={"name": ""})
@example(which=ModelRecord, changes={"head_dim": 2**31})
@example(which=ChunkHeader, changes={"layers": 0, "codec": []})
@given(
    which=st.sampled_from(RECORDS),
    changes=st.dictionaries(
        st.sampled_from(
            [
                "format",
                "magic",
                "chunk_tokens",
                "created",
                "id",
                "name",
                "version",
                "num_layers",
                "num_kv_heads",
                "head_dim",
                "dtype",
                "key",
                "parent",
                "index",
                "model",
                "tokens",
                "layers",
                "codec",
                "crcs",
                "retired_at",
                "retired_by",
                "reason",
            ]
        ),
        edge_values | msgpack_values | st.just("__delete__"),
        max_size=4,
    ),
)
def test_mutated_valid_records(which: type, changes: dict[str, object]) -> None:
    """Valid records with some fields deleted or replaced by arbitrary values."""
    obj = _valid_obj(which)
    for field, value in changes.items():
        if value == "__delete__":
            obj.pop(field, None)
        else:
            obj[field] = value
    data = msgpack.packb(obj, use_bin_type=True)
    try:
        rec = which.from_msgpack(data)
    except (IntegrityError, FormatVersionError):
        return
    # Whatever parses is well-formed.
    if isinstance(rec, ChunkHeader):
        assert len(rec.key) == len(rec.parent) == 32
        assert len(rec.model_id) == 16
        assert 1 <= rec.num_layers <= 2**16
        assert 1 <= rec.num_tokens <= 2**24
        assert isinstance(rec.codec, str)
        assert len(rec.layer_crcs) == 4 * rec.num_layers
    elif isinstance(rec, RootRecord):
        assert 1 <= rec.chunk_tokens <= 2**24
    elif isinstance(rec, ModelRecord):
        assert len(rec.model_id) == 16
        assert rec.spec.num_layers >= 1
    else:
        assert len(rec.model_id) == 16
        assert isinstance(rec.retired_by, str)
