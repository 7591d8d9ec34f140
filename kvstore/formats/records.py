"""Small metadata records, stored as msgpack maps and validated defensively on read.

Every record carries ``format`` (the format version that wrote it). Readers
enforce a size limit before unpacking and check each field's type and range, so
a damaged or hostile object yields IntegrityError / FormatVersionError, never a
crash or a huge allocation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from kvstore.errors import FormatVersionError, IntegrityError, InvalidInputError
from kvstore.formats import FORMAT_VERSION
from kvstore.formats.codecs import DEFAULT_CODEC, get_codec
from kvstore.formats.dtypes import dtype_info_by_name
from kvstore.formats.keys import model_id as derive_model_id
from kvstore.spec import MAX_DIM, MAX_LAYERS, ModelSpec

__all__ = ["ChunkHeader", "chunk_header_limit", "ModelRecord", "RetirementRecord", "RootRecord", "STORE_MAGIC"]

STORE_MAGIC = "kvstore"
_MAX_SMALL_RECORD = 64 * 1024


def chunk_header_limit(num_layers: int) -> int:
    """Most bytes a chunk header of ``num_layers`` layers may take (its 4-byte layer crcs included)."""
    return 1024 + 4 * num_layers


T = TypeVar("T")


def _unpack(data: bytes, max_size: int, kind: str) -> dict[str, Any]:
    if len(data) > max_size:
        raise IntegrityError(f"{kind} record is {len(data)} bytes, over the {max_size}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise IntegrityError(f"{kind} record is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"{kind} record is not a map")
    version = obj.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise IntegrityError(f"{kind} record has no format version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{kind} record has format version {version}; this kvstore reads version {FORMAT_VERSION}"
        )
    return obj


def _get(obj: dict[str, Any], name: str, typ: type[T], kind: str) -> T:
    value = obj.get(name)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise IntegrityError(f"{kind} record field {name!r} is missing or not {typ.__name__}")
    return value


def _get_model_id(obj: dict[str, Any], kind: str) -> bytes:
    model_id = _get(obj, "id", bytes, kind)
    if len(model_id) != 16:
        raise IntegrityError(f"{kind} record id must be 16 bytes")
    return model_id


def _get_int(obj: dict[str, Any], name: str, kind: str, lo: int, hi: int) -> int:
    value = _get(obj, name, int, kind)
    if not lo <= value <= hi:
        raise IntegrityError(f"{kind} record field {name!r}={value} is outside [{lo}, {hi}]")
    return value


def _get_number(obj: dict[str, Any], name: str, kind: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise IntegrityError(f"{kind} record field {name!r} is missing or not a number")
    if not math.isfinite(value):  # timestamps: NaN would never compare with a GC cut-off
        raise IntegrityError(f"{kind} record field {name!r} is not finite")
    return float(value)


def _pack(obj: dict[str, Any]) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


@dataclass(frozen=True, slots=True)
class RootRecord:
    """Store-wide settings, written once when a store is created.

    ``codec`` is every chunk's: a model's chunks of one length share one zarr
    array, whose ``zarr.json`` names one codec chain.
    """

    chunk_tokens: int
    codec: str = DEFAULT_CODEC
    created: float = field(default_factory=time.time)

    def to_msgpack(self) -> bytes:
        return _pack(
            {
                "format": FORMAT_VERSION,
                "magic": STORE_MAGIC,
                "chunk_tokens": self.chunk_tokens,
                "codec": self.codec,
                "created": self.created,
            }
        )

    @classmethod
    def from_msgpack(cls, data: bytes) -> RootRecord:
        try:
            obj = _unpack(data, _MAX_SMALL_RECORD, "root")
        except FormatVersionError as exc:
            version = msgpack.unpackb(data, raw=False).get("format")  # _unpack parsed it before refusing
            raise FormatVersionError(
                f"the store is in kvstore format version {version}; this kvstore reads format version "
                f"{FORMAT_VERSION} only (there is no migration: save into a new store)"
            ) from exc
        if obj.get("magic") != STORE_MAGIC:
            raise IntegrityError("root record does not identify a kvstore store")
        codec = _get(obj, "codec", str, "root")
        get_codec(codec, stored=True)  # a codec this kvstore does not know: a newer format
        return cls(
            chunk_tokens=_get_int(obj, "chunk_tokens", "root", 1, 1 << 24),
            codec=codec,
            created=_get_number(obj, "created", "root"),
        )


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model spec seen by the store: lets tools name models and gives the GC its roots."""

    model_id: bytes
    spec: ModelSpec
    created: float = field(default_factory=time.time)

    def to_msgpack(self) -> bytes:
        s = self.spec
        return _pack(
            {
                "format": FORMAT_VERSION,
                "id": self.model_id,
                "name": s.name,
                "version": s.version,
                "num_layers": s.num_layers,
                "num_kv_heads": s.num_kv_heads,
                "head_dim": s.head_dim,
                "dtype": s.dtype_name,
                "created": self.created,
            }
        )

    @classmethod
    def from_msgpack(cls, data: bytes) -> ModelRecord:
        k = "model"
        obj = _unpack(data, _MAX_SMALL_RECORD, k)
        model_id = _get_model_id(obj, k)
        try:
            spec = ModelSpec(
                name=_get(obj, "name", str, k),
                version=_get(obj, "version", str, k),
                num_layers=_get_int(obj, "num_layers", k, 1, MAX_LAYERS),
                num_kv_heads=_get_int(obj, "num_kv_heads", k, 1, MAX_DIM),
                head_dim=_get_int(obj, "head_dim", k, 1, MAX_DIM),
                dtype=dtype_info_by_name(_get(obj, "dtype", str, k)).torch_dtype,
            )
        except InvalidInputError as exc:
            raise IntegrityError(f"model record holds an invalid spec: {exc}") from None
        if model_id != derive_model_id(spec):
            raise IntegrityError(f"model record id does not match its spec {spec.label}")
        return cls(model_id=model_id, spec=spec, created=_get_number(obj, "created", k))


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """Inside every data object: binds its bytes to the chunk's key, chain position, model, size and codec.

    A data object found under a key it does not name (copied, misplaced, or
    served by a confused cache) is damage, never a hit.
    """

    key: bytes
    parent: bytes
    index: int
    model_id: bytes
    num_tokens: int
    num_layers: int
    codec: str
    layer_crcs: bytes = b""
    """u32le crc32c of each layer's stored bytes: binds every layer's place to this chunk."""
    created: float = field(default_factory=time.time)

    def to_msgpack(self) -> bytes:
        return _pack(
            {
                "format": FORMAT_VERSION,
                "key": self.key,
                "parent": self.parent,
                "index": self.index,
                "model": self.model_id,
                "tokens": self.num_tokens,
                "layers": self.num_layers,
                "codec": self.codec,
                "crcs": self.layer_crcs,
                "created": self.created,
            }
        )

    def layer_crc(self, layer: int) -> bytes:
        return self.layer_crcs[4 * layer : 4 * layer + 4]

    @classmethod
    def from_msgpack(cls, data: bytes) -> ChunkHeader:
        k = "chunk header"
        obj = _unpack(data, chunk_header_limit(MAX_LAYERS), k)
        key, parent, model, crcs = (_get(obj, f, bytes, k) for f in ("key", "parent", "model", "crcs"))
        if len(key) != 32 or len(parent) != 32 or len(model) != 16:
            raise IntegrityError("chunk header key/parent/model have wrong lengths")
        num_layers = _get_int(obj, "layers", k, 1, MAX_LAYERS)
        if len(crcs) != 4 * num_layers:
            raise IntegrityError("chunk header has not one crc per layer")
        return cls(
            key=key,
            parent=parent,
            index=_get_int(obj, "index", k, 0, 1 << 40),
            model_id=model,
            num_tokens=_get_int(obj, "tokens", k, 1, 1 << 24),
            num_layers=num_layers,
            codec=_get(obj, "codec", str, k),
            layer_crcs=crcs,
            created=_get_number(obj, "created", k),
        )


_MAX_RETIRED_TEXT = 4096


@dataclass(frozen=True, slots=True)
class RetirementRecord:
    """Retires one model version: written once, create-only, beside its model record.

    Its presence removes the model from the GC's roots and makes saves under it
    fail. The model record itself is never rewritten (other writers create it
    with create-only puts), so retirement is a separate immutable object.
    """

    model_id: bytes
    retired_by: str
    reason: str | None = None
    retired_at: float = field(default_factory=time.time)

    def to_msgpack(self) -> bytes:
        return _pack(
            {
                "format": FORMAT_VERSION,
                "id": self.model_id,
                "retired_at": self.retired_at,
                "retired_by": self.retired_by,
                "reason": self.reason,
            }
        )

    @classmethod
    def from_msgpack(cls, data: bytes) -> RetirementRecord:
        k = "retirement"
        obj = _unpack(data, _MAX_SMALL_RECORD, k)
        model_id = _get_model_id(obj, k)
        by = _get(obj, "retired_by", str, k)
        reason = obj.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise IntegrityError("retirement record field 'reason' is not a string")
        if len(by) > _MAX_RETIRED_TEXT or (reason is not None and len(reason) > _MAX_RETIRED_TEXT):
            raise IntegrityError("retirement record text fields are too long")
        return cls(model_id=model_id, retired_by=by, reason=reason, retired_at=_get_number(obj, "retired_at", k))
