"""Helpers for the damage tests: deterministic prompts, raw access to stored objects, bit-exact checks.

Damage is done through the storage boundary (``kvstore.storage.open_object_store``),
so the same code breaks objects in a local directory and in ``memory://``.
The crash test's child process imports this module too, so it must stay free of
pytest and test-only imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

import torch

import kvstore
from kvstore.formats.keys import ChunkKey, chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path
from kvstore.formats.shard import ShardHead, encode_head, parse_head
from kvstore.storage import ObjectStore, open_object_store

LayerKV = tuple[torch.Tensor, torch.Tensor]

CT = 16
SPEC = kvstore.ModelSpec("damage", "v1", num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)


def make_tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, 2**31 - 1, (n,), generator=gen, dtype=torch.int64).tolist()


def make_kv(spec: kvstore.ModelSpec, n: int, seed: int) -> list[LayerKV]:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, spec.num_kv_heads, spec.head_dim)
    return [
        (
            torch.randn(shape, generator=gen).to(spec.dtype),
            torch.randn(shape, generator=gen).to(spec.dtype),
        )
        for _ in range(spec.num_layers)
    ]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def assert_kv_equal(actual: Sequence[LayerKV], expected: Sequence[LayerKV], num_tokens: int) -> None:
    """``actual`` is bit-exactly the first ``num_tokens`` tokens of ``expected`` (dtype and shape included)."""
    assert len(actual) == len(expected)
    for layer, (got, want) in enumerate(zip(actual, expected, strict=True)):
        for name, g, w in zip("KV", got, want, strict=True):
            w = w[:num_tokens]
            assert g.dtype == w.dtype, f"layer {layer} {name}: dtype {g.dtype} != {w.dtype}"
            assert tuple(g.shape) == tuple(w.shape), f"layer {layer} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
            assert torch.equal(bits(g), bits(w)), f"layer {layer} {name}: bits differ"


def chunks_of(spec: kvstore.ModelSpec, tokens: Sequence[int], ct: int = CT) -> list[tuple[ChunkKey, str]]:
    """(key, data object path) of every chunk of ``tokens``, tail included."""
    mid = model_id(spec)
    return [(k, data_path(mid, k.digest, k.num_tokens)) for k in chunk_keys(spec, normalize_tokens(tokens), ct)]


@contextlib.asynccontextmanager
async def raw_store(url: str) -> AsyncIterator[ObjectStore]:
    backend = await open_object_store(url)
    try:
        yield backend
    finally:
        await backend.close()


async def listing(url: str) -> dict[str, int]:
    """Every object under the store root, with its size."""
    async with raw_store(url) as backend:
        return {m.key: m.size async for m in backend.list("")}


async def read_data(backend: ObjectStore, path: str, spec: kvstore.ModelSpec = SPEC) -> tuple[bytes, ShardHead]:
    """A chunk's data object and its parsed index and header."""
    data = await backend.get(path)
    return data, parse_head(data, spec.num_layers, len(data))


async def rewrite_header(backend: ObjectStore, path: str, spec: kvstore.ModelSpec = SPEC, **changes: object) -> None:
    """Re-encode a chunk's header with some fields changed, index and checksums made consistent (a lying header)."""
    data, head = await read_data(backend, path, spec)
    header = dataclasses.replace(head.header, **changes)  # type: ignore[arg-type]
    layers = [data[s.offset : s.end] for s in head.spans]
    await backend.put(path, encode_head(header, [len(x) for x in layers]) + b"".join(layers))


def flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos % len(out)] ^= 0x40
    return bytes(out)


__all__ = [
    "CT",
    "SPEC",
    "assert_kv_equal",
    "chunks_of",
    "flip",
    "listing",
    "make_kv",
    "make_tokens",
    "raw_store",
    "read_data",
    "rewrite_header",
]
