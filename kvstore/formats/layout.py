"""Where everything lives under a store root, and each chunk array's zarr v3 metadata.

    kvstore.msgpack                                   root record
    models/<model-id>.msgpack                         model record
    models/<model-id>.retired.msgpack                 retirement record (create-only; never rewritten)
    chunks/<model-id>/<n>/zarr.json                   one zarr v3 array per model and chunk length n
    chunks/<model-id>/<n>/c/0/0/0/0/0/<k0>/<k1>/<k2>/<k3>
                                                      data object of the chunk of n tokens with key k:
                                                      one shard holding every layer; its create-only
                                                      write commits the chunk (the only object a chunk has)
    chunks/<model-id>/tails/<p[0:2]>/<p[2:4]>/<p>/<n> marker: a partial chunk of n tokens follows chunk p
    access/<model-id>/<name>                          access record: chunk uses (kvstore/formats/access.py)

A chunk's grid position in its array comes from its key (``key_coords``): its
first two bytes, then two 52-bit numbers (120 bits of the key), in decimal.
The first two give a two-level fan-out of at most 256 entries each, as the tail
markers' hex pairs do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from kvstore.formats import FORMAT_VERSION
from kvstore.formats.codecs import get_codec
from kvstore.formats.dtypes import dtype_info
from kvstore.spec import ModelSpec

__all__ = [
    "CHUNKS_DIR",
    "KEY_GRID",
    "MODELS_DIR",
    "ROOT_RECORD",
    "SHARD_GRID",
    "TAILS_DIR",
    "ZARR_JSON",
    "ChunkObject",
    "array_prefix",
    "chunk_model_id",
    "data_path",
    "is_cacheable",
    "key_coords",
    "metadata_path",
    "model_chunks_prefix",
    "model_record_path",
    "parse_chunk_object",
    "parse_tail_marker",
    "retirement_record_path",
    "tail_marker_path",
    "tails_prefix",
    "zarr_array_metadata",
]

ROOT_RECORD = "kvstore.msgpack"
MODELS_DIR = "models"
CHUNKS_DIR = "chunks"
ZARR_JSON = "zarr.json"
TAILS_DIR = "tails"
KEY_GRID = (256, 256, 1 << 52, 1 << 52)
"""Sizes of the key dimensions (``key_coords``); below 2^53 every coordinate is exact as a float64 (zarr-python)."""
DIMENSION_NAMES = ("layer", "kv", "token", "head", "dim", "key0", "key1", "key2", "key3")
SHARD_GRID = "c/0/0/0/0/0/"  # zarr's default chunk key prefix of a shard: it spans the five KV dimensions whole
_MAX_TOKENS = 1 << 24


def model_record_path(model_id: bytes) -> str:
    return f"{MODELS_DIR}/{model_id.hex()}.msgpack"


def retirement_record_path(model_id: bytes) -> str:
    """Where the record that retires a model version lives, beside its model record."""
    return f"{MODELS_DIR}/{model_id.hex()}.retired.msgpack"


def model_chunks_prefix(model_id: bytes) -> str:
    return f"{CHUNKS_DIR}/{model_id.hex()}/"


def array_prefix(model_id: bytes, num_tokens: int) -> str:
    """The zarr array holding every chunk of ``num_tokens`` tokens of a model (full chunks: the store's C)."""
    return f"{CHUNKS_DIR}/{model_id.hex()}/{num_tokens}/"


def metadata_path(model_id: bytes, num_tokens: int) -> str:
    """The ``zarr.json`` of that array: written once, shared by all its chunks."""
    return f"{array_prefix(model_id, num_tokens)}{ZARR_JSON}"


def key_coords(key: bytes) -> tuple[int, int, int, int]:
    """A chunk's position along the array's key dimensions: 120 bits of its 256-bit key.

    Bytes 0 and 1, then the top 52 bits of bytes 2-8 and of bytes 9-15. Two keys
    sharing them would share an object; the header in it names the full key, so
    a reader of the other chunk finds damage, never another chunk's KV.
    """
    return key[0], key[1], int.from_bytes(key[2:9], "big") >> 4, int.from_bytes(key[9:16], "big") >> 4


def data_path(model_id: bytes, key: bytes, num_tokens: int) -> str:
    """Path of a chunk's data object: zarr's default chunk key of its shard in the array of its length."""
    return f"{array_prefix(model_id, num_tokens)}{SHARD_GRID}{'/'.join(map(str, key_coords(key)))}"


def is_cacheable(key: str) -> bool:
    """Whether a cache tier may serve ``key`` without asking the source.

    Only chunk data objects and array metadata: content-addressed, never
    rewritten with other bytes. Records (root, models, retirements) and tail
    markers can appear or disappear, so they always come from the source.
    """
    parsed = parse_chunk_object(key)
    return parsed is not None and parsed.kind != "tail"


def tails_prefix(model_id: bytes, parent: bytes) -> str:
    """Where markers of partial (tail) chunks chained on ``parent`` live.

    A query that extends a saved prompt cannot derive the saved tail's length;
    listing these markers finds it with one request.
    """
    p = parent.hex()
    return f"{CHUNKS_DIR}/{model_id.hex()}/{TAILS_DIR}/{p[0:2]}/{p[2:4]}/{p}/"


def tail_marker_path(model_id: bytes, parent: bytes, num_tokens: int) -> str:
    return f"{tails_prefix(model_id, parent)}{num_tokens}"


def parse_tail_marker(key: str) -> int | None:
    """The token count in a tail marker's key, or None if the name is not a marker."""
    return _decimal(key.rsplit("/", 1)[-1], _MAX_TOKENS + 1) or None


@dataclass(frozen=True, slots=True)
class ChunkObject:
    """What a key under ``chunks/`` is: a data object, an array's metadata or a tail marker."""

    model: str
    """The model id, hex."""
    kind: str
    """``"data"``, ``"metadata"`` or ``"tail"``."""
    num_tokens: int
    coords: tuple[int, int, int, int] | None = None
    """Data objects: the key coordinates (``key_coords``)."""
    parent: str | None = None
    """Tail markers: the parent chunk's key, hex."""


def _decimal(text: str, bound: int) -> int | None:
    """``text`` as a canonical decimal (no sign, no leading zero) below ``bound``, else None."""
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0") or len(text) > 19:
        return None
    value = int(text)
    return value if value < bound else None


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def chunk_model_id(key: str) -> str:
    """The model id (hex) of a key under ``chunks/<mid>/``, whether it follows the layout or not; else ""."""
    parts = key.split("/", 2)
    return parts[1] if len(parts) == 3 and parts[0] == CHUNKS_DIR and _is_hex(parts[1], 32) else ""


def parse_chunk_object(key: str) -> ChunkObject | None:
    """Parse a key of the ``chunks/`` layout; None for anything else (garbage to a GC)."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != CHUNKS_DIR or not _is_hex(parts[1], 32):
        return None
    mid = parts[1]
    if parts[2] == TAILS_DIR:
        if len(parts) != 7 or not _is_hex(parts[5], 64) or parts[3] != parts[5][0:2] or parts[4] != parts[5][2:4]:
            return None
        n = _decimal(parts[6], _MAX_TOKENS + 1)
        return None if not n else ChunkObject(mid, "tail", n, parent=parts[5])
    n = _decimal(parts[2], _MAX_TOKENS + 1)
    if not n:
        return None
    if len(parts) == 4:
        return ChunkObject(mid, "metadata", n) if parts[3] == ZARR_JSON else None
    if len(parts) != 13 or "/".join(parts[3:9]) + "/" != SHARD_GRID:
        return None
    coords = tuple(_decimal(p, bound) for p, bound in zip(parts[9:], KEY_GRID, strict=True))
    if None in coords:
        return None
    return ChunkObject(mid, "data", n, coords=coords)  # type: ignore[arg-type]


@lru_cache(maxsize=256)
def zarr_array_metadata(spec: ModelSpec, num_tokens: int, codec: str) -> bytes:
    """The ``zarr.json`` of a model's chunks of ``num_tokens`` tokens.

    Shape [layers, 2, tokens, heads, dim, 256, 256, 2^52, 2^52]: a chunk is the
    shard at its key's coordinates (``key_coords``), one inner chunk per layer.
    """
    info = dtype_info(spec.dtype)
    kv = [spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim]
    shape = [*kv, *KEY_GRID]
    outer = [*kv, *(1 for _ in KEY_GRID)]
    inner = [1, *outer[1:]]
    checksum = {"name": "crc32c"}
    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": inner,
            "codecs": [*get_codec(codec).zarr_codecs(info.itemsize), checksum],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, checksum],
            "index_location": "start",
        },
    }
    meta = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": shape,
        "data_type": info.zarr_data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": outer}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [sharding],
        "attributes": {
            "kvstore": {
                "format": FORMAT_VERSION,
                "dtype": info.name,
                "model": spec.name,
                "model_version": spec.version,
                "codec": codec,
            }
        },
        "dimension_names": list(DIMENSION_NAMES),
    }
    return json.dumps(meta, indent=2, ensure_ascii=True).encode()
