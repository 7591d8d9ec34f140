"""Access records (docs/FORMAT.md section 14): golden bytes, the doc's vector, and refusal of damaged input."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import google_crc32c
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import FormatVersionError, IntegrityError
from kvstore.formats.access import AccessRecord, access_prefix, access_record_name, parse_access_key

MID = bytes.fromhex("482f55dc4f348e3403f32e92a1684471")
WRITER = bytes.fromhex("0102030405060708")
GOLDEN = bytes.fromhex(
    "87a6666f726d617403a26964c410482f55dc4f348e3403f32e92a1684471a6777269746572c4080102030405060708a56669727374"
    "ce6553f100a46c617374ce6553f17ba46b657973c4100123456789abcdeffedcba9876543210a574696d6573c4087bf1536500f1"
    "5365a4b6e5c6"
)
KEY = "access/482f55dc4f348e3403f32e92a1684471/1700000123000-0102030405060708-00000001"
FORMAT_MD = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def _record() -> AccessRecord:
    keys = np.array([0x0123456789ABCDEF, 0xFEDCBA9876543210], np.uint64)
    return AccessRecord(MID, WRITER, keys, np.array([1700000123, 1700000000], np.uint32))


def test_golden_bytes_and_name() -> None:
    rec = _record()
    assert rec.to_msgpack() == GOLDEN
    back = AccessRecord.from_msgpack(GOLDEN)
    assert back.keys.tolist() == rec.keys.tolist()
    assert back.times.tolist() == rec.times.tolist()
    assert (back.first, back.last, back.model_id, back.writer) == (1700000000, 1700000123, MID, WRITER)
    assert access_prefix(MID) + access_record_name(rec.last, WRITER, 1) == KEY
    assert parse_access_key(KEY) == (MID.hex(), 1700000123.0)
    assert parse_access_key("access/xyz/1") is None
    assert parse_access_key("chunks/" + KEY[7:]) is None


def test_the_doc_vector_by_hand() -> None:
    """FORMAT.md's vector, rebuilt with msgpack and crc32c only, as section 14.1 states it."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    block = re.search(r'```text\nvector: "access-record"\n(.*?)```', text, flags=re.S)
    assert block is not None
    v = {name: json.loads(value) for name, _, value in (ln.partition(": ") for ln in block[1].strip().splitlines())}
    body = msgpack.packb(
        {
            "format": 3,
            "id": bytes.fromhex(v["model_id"]),
            "writer": bytes.fromhex(v["writer"]),
            "first": min(v["times"]),
            "last": max(v["times"]),
            "keys": b"".join(bytes.fromhex(k) for k in v["keys"]),  # big-endian prefixes: the key's first bytes
            "times": b"".join(t.to_bytes(4, "little") for t in v["times"]),
        },
        use_bin_type=True,
    )
    whole = body + google_crc32c.value(body).to_bytes(4, "little")
    assert whole.hex() == v["bytes"]
    assert GOLDEN.hex() == v["bytes"]
    assert v["key"] == KEY


def _repack(**changes: object) -> bytes:
    obj = msgpack.unpackb(GOLDEN[:-4], raw=False)
    obj.update(changes)
    body = msgpack.packb({k: v for k, v in obj.items() if v is not None}, use_bin_type=True)
    return body + google_crc32c.value(body).to_bytes(4, "little")


@pytest.mark.parametrize(
    "changes",
    [
        {"keys": b"\x00" * 12},
        {"times": b"\x00" * 4},
        {"first": 5},
        {"last": 1 << 32},
        {"id": b"short"},
        {"writer": b"\x00" * 9},
        {"writer": None},
        {"first": True},
    ],
)
def test_inconsistent_records_are_damage(changes: dict[str, object]) -> None:
    with pytest.raises(IntegrityError):
        AccessRecord.from_msgpack(_repack(**changes))


def test_crc_and_version() -> None:
    damaged = bytearray(GOLDEN)
    damaged[20] ^= 1
    with pytest.raises(IntegrityError, match="checksum"):
        AccessRecord.from_msgpack(bytes(damaged))
    with pytest.raises(FormatVersionError):
        AccessRecord.from_msgpack(_repack(format=4))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_hostile_bytes_never_crash(data: bytes, with_crc: bool) -> None:
    if with_crc:
        data += google_crc32c.value(data).to_bytes(4, "little")
    with contextlib.suppress(IntegrityError, FormatVersionError):
        AccessRecord.from_msgpack(data)
