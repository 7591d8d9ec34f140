"""A GC run's finished work in a local file, so that an interrupted run resumes where it stopped.

The file is an append-only log of frames (length, crc32, msgpack payload):
a header (state version, store URL, the run's start time and grace, dry run or
not), then one frame per finished mark partition (its chunk headers as zlib-
compressed arrays, the counts), per finished sweep partition (its counts) and
per delete batch (the objects it deleted). A frame is written whole or is
detected as torn and ignored with everything after it, so a crash at any point
leaves a usable file; a process that dies loses at most frames not yet written.

Why resuming is safe, and when a checkpoint is refused: docs/FORMAT.md,
"Garbage collection".
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import IO, Any

import msgpack

from kvstore.gc.tally import Tally

__all__ = ["STATE_VERSION", "Checkpoint", "MarkedPartition", "encode_mark"]

STATE_VERSION = 2
"""Version of the checkpoint's content; a file of another version is not resumed.

2: partitions of format version 3's layout (``kvstore.gc.bulk.Partition.name``).
"""

_KIND = "kvstore-gc-checkpoint"
_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload


@dataclass(slots=True)
class MarkedPartition:
    """One finished mark partition: objects listed, headers read, models found protected, header columns."""

    name: str
    """The partition's ``kvstore.gc.bulk.Partition.name``."""
    listed: int
    read: int
    protected: dict[str, str]
    columns: dict[str, dict[str, tuple[str, bytes]]]
    """Model id (hex) -> column name -> (array typecode, raw little-endian bytes)."""


def encode_mark(part: MarkedPartition) -> bytes:
    """The frame of a finished mark partition (compression included: run it off the event loop)."""
    columns = {
        mid: {name: [code, zlib.compress(raw, 1)] for name, (code, raw) in cols.items()}
        for mid, cols in part.columns.items()
    }
    return _frame(
        {
            "t": "mark",
            "p": part.name,
            "listed": part.listed,
            "read": part.read,
            "protected": part.protected,
            "columns": columns,
        }
    )


def _frame(record: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(record, use_bin_type=True)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_mark(rec: dict[str, Any]) -> MarkedPartition:
    columns = {
        str(mid): {str(name): (str(code), zlib.decompress(data)) for name, (code, data) in cols.items()}
        for mid, cols in rec["columns"].items()
    }
    protected = {str(k): str(v) for k, v in rec["protected"].items()}
    return MarkedPartition(str(rec["p"]), int(rec["listed"]), int(rec["read"]), protected, columns)


@dataclass(slots=True)
class Checkpoint:
    """An open checkpoint file; ``open`` resumes it or starts it afresh (``note`` says which, and why)."""

    path: str
    t0: float
    resumed: bool
    note: str
    marked: list[MarkedPartition] = field(default_factory=list)
    swept: dict[str, Tally] = field(default_factory=dict)
    freed: list[Tally] = field(default_factory=list)
    _fh: IO[bytes] | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, url: str, t0: float, grace: float, dry_run: bool, now: float | None = None
    ) -> Checkpoint:
        """Resume the run recorded at ``path`` if it is one of this store, grace and mode, started within the grace.

        Otherwise (no file, another store, version or mode, too old, unreadable)
        start a new one for a run that starts at ``t0``. Blocking file I/O.
        """
        path = os.fspath(path)
        now = time.time() if now is None else now
        records, good = _read(path)
        why = _refusal(records[0] if records else None, url=url, grace=grace, dry_run=dry_run, now=now)
        if why is None:
            head = records[0]
            ckpt = cls(path, float(head["t0"]), True, "")
            for rec in records[1:]:
                kind = rec.get("t")
                if kind == "mark":
                    ckpt.marked.append(_decode_mark(rec))
                elif kind == "sweep":
                    ckpt.swept[str(rec["p"])] = Tally.from_obj(rec["tally"])
                elif kind == "freed":
                    ckpt.freed.append(Tally.from_obj(rec["tally"]))
            fh = open(path, "r+b")  # noqa: SIM115 - held open for the run, closed by close()
            fh.truncate(good)  # drop a torn last frame before appending
            fh.seek(good)
            ckpt._fh = fh
            ckpt.note = (
                f"resumed the run started {now - ckpt.t0:.0f} s ago from {path}: {len(ckpt.marked)} mark and "
                f"{len(ckpt.swept)} sweep partitions were done"
            )
            return ckpt
        ckpt = cls(path, t0, False, "" if why == "" else f"started afresh: the checkpoint {path} {why}")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        ckpt._fh = open(path, "wb")  # noqa: SIM115
        header = {"t": "head", "kind": _KIND, "version": STATE_VERSION, "url": url, "t0": t0, "grace": grace}
        ckpt._append(_frame({**header, "dry_run": dry_run}))
        return ckpt

    def add_mark(self, frame: bytes) -> None:
        """Record a finished mark partition (``encode_mark``'s frame)."""
        self._append(frame)

    def add_sweep(self, name: str, tally: Tally) -> None:
        """Record a finished sweep partition (by name) and its counts (those of its deleted objects excepted)."""
        self._append(_frame({"t": "sweep", "p": name, "tally": tally.to_obj()}))

    def add_freed(self, tally: Tally) -> None:
        """Record the objects one delete batch removed."""
        self._append(_frame({"t": "freed", "tally": tally.to_obj()}))

    def _append(self, frame: bytes) -> None:
        if self._fh is None:
            raise ValueError("checkpoint is closed")
        self._fh.write(frame)
        self._fh.flush()  # in the OS once written: a dying process loses nothing recorded

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                os.fsync(fh.fileno())
            finally:
                fh.close()

    def remove(self) -> None:
        """The run finished: forget it, so that the next run with this path starts afresh."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _read(path: str) -> tuple[list[dict[str, Any]], int]:
    """The intact frames of the file and the length they span (0 and nothing when absent)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return [], 0
    records: list[dict[str, Any]] = []
    pos = 0
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        payload = data[pos + _FRAME.size : pos + _FRAME.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        try:
            rec = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException):
            break
        if not isinstance(rec, dict):
            break
        records.append(rec)
        pos += _FRAME.size + length
    return records, pos


def _refusal(head: dict[str, Any] | None, *, url: str, grace: float, dry_run: bool, now: float) -> str | None:
    """Why a checkpoint whose header is ``head`` cannot be resumed ("" when there is none); None when it can."""
    if head is None:
        return ""
    if head.get("t") != "head" or head.get("kind") != _KIND:
        return "is not a kvstore GC checkpoint"
    if head.get("version") != STATE_VERSION:
        return f"is of state version {head.get('version')!r}; this kvstore writes version {STATE_VERSION}"
    if head.get("url") != url:
        return f"is of another store ({head.get('url')!r})"
    if head.get("grace") != grace:
        return f"is of a run with another grace ({head.get('grace')!r} s)"
    if head.get("dry_run") != dry_run:
        return "is of a dry run" if head.get("dry_run") else "is of a run that deletes (this one is a dry run)"
    t0 = head.get("t0")
    if not isinstance(t0, (int, float)) or now - t0 > grace:
        return "is of a run started more than the grace ago: its mark is too old to trust"
    return None
