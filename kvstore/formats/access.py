"""Access records: which chunks a store instance used, and when, so the GC can evict by recency.

An access record is ``access/<model id hex>/<name>``: a canonical msgpack map
followed by the u32le crc32c of the map (docs/FORMAT.md, "Access records and
eviction"). It lists, per chunk used in one batch, the 64-bit big-endian prefix
of the chunk key (what the GC's mark works with) and the use's time in whole
seconds. Records are append-only: writers only create them; the GC merges and
deletes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kvstore.errors import IntegrityError
from kvstore.formats import FORMAT_VERSION
from kvstore.formats.records import _get, _get_int, _get_model_id, _pack, _unpack
from kvstore.formats.shard import crc32c

__all__ = [
    "ACCESS_DIR",
    "MAX_ACCESS_ENTRIES",
    "AccessRecord",
    "access_prefix",
    "access_record_name",
    "parse_access_key",
]

ACCESS_DIR = "access"
MAX_ACCESS_ENTRIES = 1 << 20
"""Most entries one record may hold (8 MiB of keys, 4 MiB of times)."""
_MAX_RECORD = 256 + 12 * MAX_ACCESS_ENTRIES + 4
_U32 = (1 << 32) - 1
_NAME = re.compile(r"^(\d{13})-([0-9a-f]{16})-(\d{8})$")


def access_prefix(model_id: bytes) -> str:
    """Where one model version's access records live (beside ``chunks/``, never under it)."""
    return f"{ACCESS_DIR}/{model_id.hex()}/"


def access_record_name(last: int, writer: bytes, seq: int) -> str:
    """``<last use in ms, 13 digits>-<writer hex>-<seq, 8 digits>``: names sort by the record's last use."""
    return f"{last * 1000:013d}-{writer.hex()}-{seq % 100_000_000:08d}"


def parse_access_key(key: str) -> tuple[str, float] | None:
    """(model id hex, last use in seconds from the name) of ``access/<mid>/<name>``, else None."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != ACCESS_DIR or len(parts[1]) != 32:
        return None
    m = _NAME.match(parts[2])
    if m is None or not all(c in "0123456789abcdef" for c in parts[1]):
        return None
    return parts[1], int(m.group(1)) / 1000


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One batch of uses of one model version's chunks by one writer.

    ``keys`` are uint64 chunk-key prefixes, ``times`` uint32 Unix seconds (rounded
    up, so a use never looks older than it was), one entry per chunk.
    """

    model_id: bytes
    writer: bytes
    keys: np.ndarray
    times: np.ndarray

    def __post_init__(self) -> None:
        if len(self.model_id) != 16 or len(self.writer) != 8:
            raise ValueError("model_id must be 16 bytes and writer 8 bytes")
        if self.keys.shape != self.times.shape or self.keys.ndim != 1 or len(self.keys) > MAX_ACCESS_ENTRIES:
            raise ValueError("keys and times must be 1-D arrays of equal length, at most MAX_ACCESS_ENTRIES")

    @property
    def first(self) -> int:
        return int(self.times.min()) if len(self.times) else 0

    @property
    def last(self) -> int:
        return int(self.times.max()) if len(self.times) else 0

    def to_msgpack(self) -> bytes:
        body = _pack(
            {
                "format": FORMAT_VERSION,
                "id": self.model_id,
                "writer": self.writer,
                "first": self.first,
                "last": self.last,
                "keys": self.keys.astype(">u8").tobytes(),
                "times": self.times.astype("<u4").tobytes(),
            }
        )
        return body + crc32c([body]).to_bytes(4, "little")

    @classmethod
    def from_msgpack(cls, data: bytes) -> AccessRecord:
        k = "access"
        if len(data) < 5 or len(data) > _MAX_RECORD:
            raise IntegrityError(f"access record is {len(data)} bytes, outside [5, {_MAX_RECORD}]")
        body, crc = data[:-4], data[-4:]
        if crc32c([body]) != int.from_bytes(crc, "little"):
            raise IntegrityError("access record checksum mismatch")
        obj = _unpack(body, _MAX_RECORD, k)
        model_id = _get_model_id(obj, k)
        writer = _get(obj, "writer", bytes, k)
        keys, times = _get(obj, "keys", bytes, k), _get(obj, "times", bytes, k)
        if len(writer) != 8:
            raise IntegrityError("access record writer id must be 8 bytes")
        n = len(times) // 4
        if len(keys) != 8 * n or len(times) != 4 * n or n > MAX_ACCESS_ENTRIES:
            raise IntegrityError("access record keys and times do not hold the same number of entries")
        first, last = _get_int(obj, "first", k, 0, _U32), _get_int(obj, "last", k, 0, _U32)
        key_arr = np.frombuffer(keys, ">u8").astype(np.uint64)
        time_arr = np.frombuffer(times, "<u4").astype(np.uint32)
        if n and (int(time_arr.min()) != first or int(time_arr.max()) != last):
            raise IntegrityError("access record first/last do not match its times")
        if not n and (first or last):
            raise IntegrityError("an empty access record must have first = last = 0")
        return cls(model_id, writer, key_arr, time_arr)
