"""Codecs for one layer's bytes in a chunk, and their zarr v3 codec-chain descriptions.

A chunk's inner chunk for layer l holds its K then V, as raw little-endian
bytes (zarr's ``bytes`` codec), optionally compressed. Each codec names the zarr
codec chain it produces so plain zarr-python can read the data, and decoders
check sizes from headers *before* allocating, so a hostile header cannot force a
huge allocation.

- ``none``: raw bytes. Fastest; the default (see docs/FORMAT.md for the numbers).
- ``lz4``: lz4 block with a 4-byte little-endian size prefix (zarr ``numcodecs.lz4``).
  Barely compresses float KV: the exponent and mantissa bytes are interleaved.
- ``blosc-lz4``: blosc with bit-shuffle then lz4 (zarr v3 core ``blosc`` codec).
  Shuffling groups exponent bits, which is what makes float KV compressible.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import lz4.block
import numpy as np

from kvstore.errors import FormatVersionError, IntegrityError, InvalidInputError

__all__ = ["CODEC_NAMES", "DEFAULT_CODEC", "Codec", "get_codec"]

Buffer = bytes | bytearray | memoryview

_BYTES_CODEC: dict[str, Any] = {"name": "bytes", "configuration": {"endian": "little"}}


class Codec(ABC):
    """Encode and decode one layer of a chunk."""

    name: str

    @abstractmethod
    def zarr_codecs(self, itemsize: int) -> list[dict[str, Any]]:
        """The zarr v3 ``codecs`` list describing this encoding."""

    @abstractmethod
    def encode(self, parts: list[memoryview], itemsize: int) -> bytes:
        """Concatenate and encode the decoded byte parts (K then V)."""

    @abstractmethod
    def decode(self, data: Buffer, nbytes: int) -> memoryview:
        """Decode ``data``; raise IntegrityError unless it yields exactly ``nbytes`` bytes."""


class _NoCompression(Codec):
    name = "none"

    def zarr_codecs(self, itemsize: int) -> list[dict[str, Any]]:
        return [_BYTES_CODEC]

    def encode(self, parts: list[memoryview], itemsize: int) -> bytes:
        return b"".join(parts)

    def decode(self, data: Buffer, nbytes: int) -> memoryview:
        if len(data) != nbytes:
            raise IntegrityError(f"layer is {len(data)} bytes, expected {nbytes}")
        return memoryview(data)


class _Lz4Block(Codec):
    name = "lz4"

    def zarr_codecs(self, itemsize: int) -> list[dict[str, Any]]:
        return [_BYTES_CODEC, {"name": "numcodecs.lz4", "configuration": {"acceleration": 1}}]

    def encode(self, parts: list[memoryview], itemsize: int) -> bytes:
        out: bytes = lz4.block.compress(b"".join(parts), store_size=True)
        return out

    def decode(self, data: Buffer, nbytes: int) -> memoryview:
        if len(data) < 4 or int.from_bytes(bytes(data[:4]), "little") != nbytes:
            raise IntegrityError("lz4 layer has a wrong size header")
        try:
            out = lz4.block.decompress(data)
        except lz4.block.LZ4BlockError as exc:
            raise IntegrityError(f"lz4 layer does not decode: {exc}") from exc
        return memoryview(out)


class _BloscLz4(Codec):
    name = "blosc-lz4"
    clevel = 5

    def zarr_codecs(self, itemsize: int) -> list[dict[str, Any]]:
        config = {"typesize": itemsize, "cname": "lz4", "clevel": self.clevel, "shuffle": "bitshuffle", "blocksize": 0}
        return [_BYTES_CODEC, {"name": "blosc", "configuration": config}]

    def encode(self, parts: list[memoryview], itemsize: int) -> bytes:
        from numcodecs import blosc

        raw = np.frombuffer(b"".join(parts), dtype=f"u{itemsize}")
        return bytes(blosc.compress(raw, b"lz4", self.clevel, blosc.BITSHUFFLE, 0))

    def decode(self, data: Buffer, nbytes: int) -> memoryview:
        from numcodecs import blosc

        # blosc header (16 bytes): version, versionlz, flags, typesize, nbytes, blocksize, cbytes (u32 LE)
        if len(data) < 16:
            raise IntegrityError("blosc layer is shorter than its header")
        header = bytes(data[:16])
        if int.from_bytes(header[4:8], "little") != nbytes or int.from_bytes(header[12:16], "little") != len(data):
            raise IntegrityError("blosc layer has wrong sizes in its header")
        out = bytearray(nbytes)
        try:
            blosc.decompress(data, out)
        except Exception as exc:  # numcodecs raises RuntimeError and others for bad data
            raise IntegrityError(f"blosc layer does not decode: {exc}") from exc
        return memoryview(out)


_CODECS: dict[str, Codec] = {c.name: c for c in (_NoCompression(), _Lz4Block(), _BloscLz4())}
CODEC_NAMES: tuple[str, ...] = tuple(_CODECS)
DEFAULT_CODEC = "none"


def get_codec(name: str, *, stored: bool = False) -> Codec:
    """The codec called ``name``. Unknown names are bad input, or a newer format when ``stored``."""
    try:
        return _CODECS[name]
    except KeyError:
        if stored:
            raise FormatVersionError(f"unknown stored codec {name!r}") from None
        raise InvalidInputError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}") from None
