"""Where everything lives under a store root, and each chunk's zarr v3 array metadata.

    kvstore.msgpack                                   root record
    models/<model-id>.msgpack                         model record
    models/<model-id>.retired.msgpack                 retirement record (create-only; never rewritten)
    chunks/<model-id>/<k[0:2]>/<k[2:4]>/<key>/        one chunk = one zarr v3 array
        zarr.json                                     array metadata, written first
        c.0.0.0.0.0                                   data object: one shard holding every layer; its
                                                      create-only write commits the chunk
        tails/<n>                                     marker: a partial chunk of n tokens follows this one
    access/<model-id>/<name>                          access record: chunk uses (kvstore/formats/access.py)

Keys and model ids are lower-case hex. The two-level fan-out keeps any one
directory (or listing prefix) to at most 256 entries before the chunk level.
"""

from __future__ import annotations

import json
from functools import lru_cache

from kvstore.formats import FORMAT_VERSION
from kvstore.formats.codecs import get_codec
from kvstore.formats.dtypes import dtype_info
from kvstore.spec import ModelSpec

__all__ = [
    "CHUNKS_DIR",
    "DATA_NAME",
    "MODELS_DIR",
    "ROOT_RECORD",
    "ZARR_JSON",
    "chunk_prefix",
    "data_path",
    "is_cacheable",
    "model_chunks_prefix",
    "model_record_path",
    "parse_tail_marker",
    "retirement_record_path",
    "tails_prefix",
    "zarr_array_metadata",
]

ROOT_RECORD = "kvstore.msgpack"
MODELS_DIR = "models"
CHUNKS_DIR = "chunks"
ZARR_JSON = "zarr.json"
DATA_NAME = "c.0.0.0.0.0"
TAILS_DIR = "tails"
DIMENSION_NAMES = ("layer", "kv", "token", "head", "dim")


def model_record_path(model_id: bytes) -> str:
    return f"{MODELS_DIR}/{model_id.hex()}.msgpack"


def retirement_record_path(model_id: bytes) -> str:
    """Where the record that retires a model version lives, beside its model record."""
    return f"{MODELS_DIR}/{model_id.hex()}.retired.msgpack"


def model_chunks_prefix(model_id: bytes) -> str:
    return f"{CHUNKS_DIR}/{model_id.hex()}/"


def chunk_prefix(model_id: bytes, key: bytes) -> str:
    h = key.hex()
    return f"{CHUNKS_DIR}/{model_id.hex()}/{h[0:2]}/{h[2:4]}/{h}/"


def data_path(chunk: str) -> str:
    """Path of a chunk's data object: zarr's default chunk key of the one shard, grid position (0, 0, 0, 0, 0)."""
    return f"{chunk}{DATA_NAME}"


def is_cacheable(key: str) -> bool:
    """Whether a cache tier may serve ``key`` without asking the source.

    Only a chunk's data object and its zarr.json: content-addressed, never
    rewritten with other bytes. Records (root, models, retirements) and tail
    markers can appear or disappear, so they always come from the source.
    """
    return key.startswith(f"{CHUNKS_DIR}/") and (key.endswith(f"/{DATA_NAME}") or key.endswith(f"/{ZARR_JSON}"))


def tails_prefix(model_id: bytes, parent: bytes) -> str:
    """Where markers of partial (tail) chunks chained on ``parent`` live.

    A query that extends a saved prompt cannot derive the saved tail's length;
    listing these markers finds it with one request.
    """
    return f"{chunk_prefix(model_id, parent)}{TAILS_DIR}/"


def parse_tail_marker(key: str) -> int | None:
    """The token count in a tail marker's key, or None if the name is not a marker."""
    name = key.rsplit("/", 1)[-1]
    return int(name) if name.isascii() and name.isdigit() and len(name) < 9 else None


@lru_cache(maxsize=256)
def zarr_array_metadata(spec: ModelSpec, num_tokens: int, codec: str) -> bytes:
    """The ``zarr.json`` of a chunk: shape [layers, 2, tokens, heads, dim] in one shard, one inner chunk per layer."""
    info = dtype_info(spec.dtype)
    shape = [spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim]
    inner = [1, *shape[1:]]
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
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shape}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
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
