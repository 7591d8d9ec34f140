"""Content-addressed chunk keys: a blake3 chain over model identity and tokens.

    root    = blake3(KEY_DOMAIN || msgpack([FORMAT_VERSION, name, version,
                     num_layers, num_kv_heads, head_dim, dtype, chunk_tokens]))
    key[i]  = blake3(key[i-1] || u32le(n_i) || u32le(tokens of chunk i)...)   (key[-1] = root)

Equal prefixes give equal keys; a different model, layout, chunk size or any
earlier token gives a different key. Nothing here depends on the process
(no ``hash()``), so keys are stable across machines and restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import blake3
import msgpack
import numpy as np
import torch

from kvstore.errors import InvalidInputError
from kvstore.formats import FORMAT_VERSION
from kvstore.spec import ModelSpec

__all__ = [
    "KEY_DOMAIN",
    "MODEL_ID_DOMAIN",
    "ChunkKey",
    "TokenInput",
    "chunk_keys",
    "key_root",
    "model_id",
    "next_key",
    "normalize_tokens",
]

KEY_DOMAIN = b"kvstore/chunk-key/v1\x00"
MODEL_ID_DOMAIN = b"kvstore/model-id/v1\x00"
_MAX_TOKEN = 2**32 - 1

TokenInput = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Chunk ``index`` of a token sequence: its digest and token range [start, end)."""

    digest: bytes
    parent: bytes
    index: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def hex(self) -> str:
        return self.digest.hex()


def _identity(spec: ModelSpec) -> list[object]:
    return [spec.name, spec.version, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype_name]


def model_id(spec: ModelSpec) -> bytes:
    """16-byte id of a model spec, independent of chunk size; names its record and chunk prefix."""
    payload = msgpack.packb(_identity(spec), use_bin_type=True)
    return blake3.blake3(MODEL_ID_DOMAIN + payload).digest()[:16]


def key_root(spec: ModelSpec, chunk_tokens: int) -> bytes:
    """The chain's starting digest: everything except the tokens that determines chunk bytes."""
    payload = msgpack.packb([FORMAT_VERSION, *_identity(spec), chunk_tokens], use_bin_type=True)
    return blake3.blake3(KEY_DOMAIN + payload).digest()


def normalize_tokens(tokens: TokenInput) -> np.ndarray:
    """Validate tokens and return them as a contiguous little-endian uint32 array."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InvalidInputError(f"tokens must be integers, got a {tokens.dtype} tensor")
        if tokens.dim() != 1:
            raise InvalidInputError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        arr = tokens.detach().to("cpu", torch.int64).numpy()
    elif isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise InvalidInputError(f"tokens must be 1-D, got shape {tokens.shape}")
        if tokens.dtype.kind not in "iu":
            raise InvalidInputError(f"tokens must be integers, got a {tokens.dtype} array")
        arr = tokens
    elif isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise InvalidInputError(f"tokens must be a list of ints, a 1-D array or tensor; got {type(tokens).__name__}")
    else:
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InvalidInputError(f"tokens must be integers, found {t!r}")
        try:
            arr = np.asarray(tokens, dtype=np.int64) if len(tokens) else np.zeros(0, np.int64)
        except OverflowError:
            raise InvalidInputError("a token id is out of range [0, 2**32)") from None
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _MAX_TOKEN):
        raise InvalidInputError("token ids must lie in [0, 2**32)")
    return np.ascontiguousarray(arr, dtype="<u4")


def chunk_keys(spec: ModelSpec, tokens: np.ndarray, chunk_tokens: int, *, include_tail: bool = True) -> list[ChunkKey]:
    """Keys of every chunk of ``tokens`` (uint32 from normalize_tokens), in order.

    The last, partial chunk is included when ``include_tail`` is true.
    """
    n = len(tokens)
    end_full = n - n % chunk_tokens
    stops = list(range(chunk_tokens, end_full + 1, chunk_tokens))
    if include_tail and end_full < n:
        stops.append(n)
    keys: list[ChunkKey] = []
    prev = key_root(spec, chunk_tokens)
    start = 0
    for i, stop in enumerate(stops):
        key = next_key(prev, i, tokens, start, stop)
        keys.append(key)
        prev, start = key.digest, stop
    return keys


def next_key(parent: bytes, index: int, tokens: np.ndarray, start: int, end: int) -> ChunkKey:
    """The key of chunk ``index`` covering ``tokens[start:end]``, chained on ``parent``."""
    h = blake3.blake3(parent)
    h.update((end - start).to_bytes(4, "little"))
    h.update(tokens[start:end].view(np.uint8).data)
    return ChunkKey(h.digest(), parent, index, start, end)
