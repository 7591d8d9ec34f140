"""Stored chunks are plain zarr v3 arrays, and docs/FORMAT.md tells the truth about them.

Chunks saved with every codec and dtype are opened with ``zarr.open_array`` alone;
then every test vector in FORMAT.md is parsed and recomputed, and a real store is
checked against the paths, bytes, digests, records and request counts it documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3
import msgpack
import numpy as np
import pytest
import torch
import zarr

import kvstore
from kvstore import ModelSpec
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import chunk_keys, key_root, model_id, normalize_tokens
from kvstore.formats.layout import chunk_prefix, commit_path, layer_path
from kvstore.formats.records import CommitRecord, ModelRecord, RootRecord

pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")

FORMAT_MD = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"
CODECS = ["none", "lz4", "blosc-lz4"]
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
ZARR_DATA_TYPE = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "uint16",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
}
LayerKV = tuple[torch.Tensor, torch.Tensor]


def _kv(spec: ModelSpec, n: int, seed: int = 0) -> list[LayerKV]:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, spec.num_kv_heads, spec.head_dim)
    return [
        (torch.randn(shape, generator=gen).to(spec.dtype), torch.randn(shape, generator=gen).to(spec.dtype))
        for _ in range(spec.num_layers)
    ]


def _bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor as an unsigned numpy array of the same width."""
    width = t.element_size()
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[width]).numpy().view(f"u{width}")


def _as_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """What zarr returns, viewed back as the real dtype (uint16 -> bfloat16, uint8 -> float8)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype == torch.uint16:
        t = t.view(torch.int16)
    return t.view(dtype)


def _expected_chunk(kv: Sequence[LayerKV], start: int, end: int) -> np.ndarray:
    """[layers, 2, tokens, heads, dim] raw bits of a chunk, as FORMAT.md section 6 lays it out."""
    return np.stack([np.stack([_bits(k[start:end]), _bits(v[start:end])]) for k, v in kv])


# ---------------------------------------------------------------------- zarr reads what kvstore wrote


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
async def test_plain_zarr_reads_every_chunk(tmp_path: Path, codec: str, dtype_name: str) -> None:
    spec = ModelSpec("interop", "v1", 3, 2, 8, DTYPES[dtype_name])
    tokens = list(range(100, 140))  # 2 full chunks of 16 and a tail of 8
    kv = _kv(spec, len(tokens))
    async with kvstore.open(tmp_path, codec=codec, chunk_tokens=16) as store:
        saved = await store.save_prefix(spec, tokens, kv)
    assert saved.num_tokens == 40
    keys = chunk_keys(spec, normalize_tokens(tokens), 16)
    assert [k.num_tokens for k in keys] == [16, 16, 8]
    for key in keys:
        arr = zarr.open_array(tmp_path / chunk_prefix(model_id(spec), key.digest), mode="r")
        assert arr.shape == (3, 2, key.num_tokens, 2, 8)
        assert arr.chunks == (1, 2, key.num_tokens, 2, 8)
        assert str(arr.dtype) == ZARR_DATA_TYPE[dtype_name]
        assert arr.metadata.dimension_names == ("layer", "kv", "token", "head", "dim")
        assert arr.attrs["kvstore"] == {
            "format": 1,
            "dtype": dtype_name,
            "model": "interop",
            "model_version": "v1",
            "codec": codec,
        }
        data = arr[:]
        want = _expected_chunk(kv, key.start, key.end)
        assert np.array_equal(data, want.view(data.dtype))
        for layer in range(spec.num_layers):
            got_k = _as_torch(arr[layer, 0], spec.dtype)
            got_v = _as_torch(arr[layer, 1], spec.dtype)
            assert got_k.dtype == spec.dtype
            assert np.array_equal(_bits(got_k), _bits(kv[layer][0][key.start : key.end]))
            assert np.array_equal(_bits(got_v), _bits(kv[layer][1][key.start : key.end]))


@pytest.mark.parametrize("codec", CODECS)
async def test_zarr_reads_one_layer_on_its_own(tmp_path: Path, codec: str) -> None:
    """One object per layer: reading arr[l] touches only layer l's object."""
    spec = ModelSpec("interop", "v1", 4, 2, 8, torch.bfloat16)
    kv = _kv(spec, 16, seed=3)
    async with kvstore.open(tmp_path, codec=codec, chunk_tokens=16) as store:
        await store.save_prefix(spec, list(range(16)), kv)
    (key,) = chunk_keys(spec, normalize_tokens(list(range(16))), 16)
    prefix = chunk_prefix(model_id(spec), key.digest)
    target = 2
    for layer in range(spec.num_layers):
        if layer != target:  # every other layer object becomes undecodable
            (tmp_path / layer_path(prefix, layer)).write_bytes(b"not a layer")
    arr = zarr.open_array(tmp_path / prefix, mode="r")
    got = arr[target]
    assert np.array_equal(got, _expected_chunk(kv, 0, 16)[target])
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever zarr raises for a broken chunk
        arr[0]


# ---------------------------------------------------------------------- FORMAT.md test vectors


def _doc_vectors() -> dict[str, dict[str, Any]]:
    """Every ``vector:`` block of the "Test vectors" section, values parsed as JSON."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    section = text.split("\n## Test vectors", 1)[1]
    vectors: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"```text\n(.*?)```", section, flags=re.S):
        fields: dict[str, Any] = {}
        for line in block.strip().splitlines():
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value)
        vectors[fields["vector"]] = fields
    return vectors


def _doc_spec(v: dict[str, Any]) -> ModelSpec:
    return ModelSpec(v["name"], v["version"], v["num_layers"], v["num_kv_heads"], v["head_dim"], DTYPES[v["dtype"]])


def _doc_chunks(v: dict[str, Any]) -> list[tuple[int, int, str]]:
    chunks = []
    i = 0
    while f"chunk[{i}]" in v:
        start, end, key = v[f"chunk[{i}]"]
        chunks.append((start, end, key))
        i += 1
    return chunks


def test_the_doc_has_every_vector() -> None:
    assert set(_doc_vectors()) == {"keys-1", "keys-2", "keys-3", "root-record", "model-record", "chunk-tiny"}


@pytest.mark.parametrize("vid", ["keys-1", "keys-2", "keys-3"])
def test_doc_key_vectors_hold(vid: str) -> None:
    v = _doc_vectors()[vid]
    spec, ct, tokens = _doc_spec(v), v["chunk_tokens"], v["tokens"]
    identity = [spec.name, spec.version, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype_name]
    assert msgpack.packb(identity, use_bin_type=True).hex() == v["identity_msgpack"]
    assert msgpack.packb([1, *identity, ct], use_bin_type=True).hex() == v["key_root_msgpack"]
    assert model_id(spec).hex() == v["model_id"]
    assert key_root(spec, ct).hex() == v["key_root"]
    keys = chunk_keys(spec, normalize_tokens(tokens), ct)
    assert [(k.start, k.end, k.hex) for k in keys] == _doc_chunks(v)
    assert blake3.blake3(bytes.fromhex(v["chunk0_preimage"])).hexdigest() == keys[0].hex


def test_doc_record_vectors_hold() -> None:
    vectors = _doc_vectors()
    root = vectors["root-record"]
    assert RootRecord(root["chunk_tokens"], root["created"]).to_msgpack().hex() == root["bytes"]
    m = vectors["model-record"]
    spec = _doc_spec(m)
    assert model_id(spec).hex() == m["id"]
    rec = ModelRecord(model_id(spec), spec, m["created"])
    assert rec.to_msgpack().hex() == m["bytes"]
    assert ModelRecord.from_msgpack(bytes.fromhex(m["bytes"])) == rec


def _tiny_kv(spec: ModelSpec, n: int) -> list[LayerKV]:
    """FORMAT.md's chunk-tiny KV: K[l][t, 0, d] = 100 l + 10 t + d, V = -K."""
    out = []
    for layer in range(spec.num_layers):
        k = torch.tensor(
            [[[100 * layer + 10 * t + d for d in range(spec.head_dim)]] for t in range(n)], dtype=spec.dtype
        )
        out.append((k, -k))
    return out


@pytest.mark.parametrize("codec", CODECS)
async def test_doc_chunk_vector_holds_on_a_real_store(tmp_path: Path, codec: str) -> None:
    v = _doc_vectors()["chunk-tiny"]
    spec, tokens = _doc_spec(v), v["tokens"]
    kv = _tiny_kv(spec, len(tokens))
    async with kvstore.open(tmp_path, codec=codec, chunk_tokens=v["chunk_tokens"]) as store:
        await store.save_prefix(spec, tokens, kv)
        hit = await store.load_prefix(spec, tokens)
    assert hit.num_tokens == len(tokens)

    mid = model_id(spec)
    assert mid.hex() == v["model_id"]
    assert (tmp_path / v["model_record"]).is_file()
    assert ModelRecord.from_msgpack((tmp_path / v["model_record"]).read_bytes()).spec == spec
    root = RootRecord.from_msgpack((tmp_path / "kvstore.msgpack").read_bytes())
    assert root.chunk_tokens == v["chunk_tokens"]
    assert key_root(spec, v["chunk_tokens"]).hex() == v["key_root"]

    keys = chunk_keys(spec, normalize_tokens(tokens), v["chunk_tokens"])
    assert [(k.start, k.end, k.hex) for k in keys] == _doc_chunks(v)
    for key in keys:
        i = key.index
        prefix = v[f"chunk[{i}].prefix"]
        assert chunk_prefix(mid, key.digest) == prefix
        assert commit_path(prefix) == v[f"chunk[{i}].commit_path"]
        commit = CommitRecord.from_msgpack((tmp_path / v[f"chunk[{i}].commit_path"]).read_bytes())
        assert (commit.key, commit.parent, commit.index) == (key.digest, key.parent, i)
        assert (commit.model_id, commit.num_tokens, commit.codec) == (mid, key.num_tokens, codec)
        for layer in range(spec.num_layers):
            path = v[f"chunk[{i}].layer[{layer}].path"]
            assert layer_path(prefix, layer) == path
            stored = (tmp_path / path).read_bytes()
            decoded = bytes.fromhex(v[f"chunk[{i}].layer[{layer}].decoded"])
            want_stored = decoded if codec == "none" else bytes.fromhex(v[f"chunk[{i}].layer[{layer}].{codec}"])
            assert stored == want_stored
            assert bytes(get_codec(codec).decode(stored, len(decoded))) == decoded
            assert commit.layer_sizes[layer] == len(stored)
            assert commit.layer_digests[layer].hex() == v[f"chunk[{i}].layer[{layer}].digest"]
            assert blake3.blake3(decoded).hexdigest() == v[f"chunk[{i}].layer[{layer}].digest"]
            # decoded = K bytes then V bytes of this layer, little-endian, C order
            k, val = kv[layer]
            assert decoded == k[key.start : key.end].numpy().tobytes() + val[key.start : key.end].numpy().tobytes()
        # the commit record is exactly the canonical encoding of its fields
        assert (tmp_path / v[f"chunk[{i}].commit_path"]).read_bytes() == commit.to_msgpack()
        arr = zarr.open_array(tmp_path / prefix, mode="r")
        assert np.array_equal(arr[:, 0], np.stack([k[key.start : key.end].numpy() for k, _ in kv]))
        assert np.array_equal(arr[:, 1], np.stack([val[key.start : key.end].numpy() for _, val in kv]))

    marker_path, marker_key = v["tail_marker"]
    assert (tmp_path / marker_path).read_bytes().hex() == marker_key

    # The documented commit record bytes: the tail's commit with codec none and a fixed time.
    if codec == "none":
        stored = CommitRecord.from_msgpack((tmp_path / v["chunk[1].commit_path"]).read_bytes())
        fixed = CommitRecord(
            stored.key,
            stored.parent,
            stored.index,
            stored.model_id,
            stored.num_tokens,
            stored.codec,
            stored.layer_sizes,
            stored.layer_digests,
            v["commit[1].created"],
        )
        assert fixed.to_msgpack().hex() == v["commit[1].bytes"]


# ---------------------------------------------------------------------- documented store behaviour


async def test_zarr_json_is_as_documented(tmp_path: Path) -> None:
    spec = ModelSpec("m", "v1", 2, 2, 8, torch.bfloat16)
    async with kvstore.open(tmp_path, codec="blosc-lz4", chunk_tokens=16) as store:
        await store.save_prefix(spec, list(range(20)), _kv(spec, 20))
    key = chunk_keys(spec, normalize_tokens(list(range(20))), 16)[1]
    meta = json.loads((tmp_path / chunk_prefix(model_id(spec), key.digest) / "zarr.json").read_text())
    assert meta == {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [2, 2, 4, 2, 8],
        "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 2, 4, 2, 8]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": get_codec("blosc-lz4").zarr_codecs(2),
        "attributes": {
            "kvstore": {"format": 1, "dtype": "bfloat16", "model": "m", "model_version": "v1", "codec": "blosc-lz4"}
        },
        "dimension_names": ["layer", "kv", "token", "head", "dim"],
    }


@pytest.mark.parametrize("codec", CODECS)
async def test_documented_request_counts(tmp_path: Path, codec: str) -> None:
    """FORMAT.md section 10: write L+2 objects per chunk, read L+1, look up with 1 HEAD per chunk."""
    layers, full = 3, 4
    spec = ModelSpec("m", "v1", layers, 2, 8, torch.float16)
    tokens = list(range(16 * full))
    async with kvstore.open(tmp_path, codec=codec, chunk_tokens=16) as store:
        base = store.stats()
        saved = await store.save_prefix(spec, tokens, _kv(spec, len(tokens)))
        s = store.stats()
        assert saved.objects_written == full * (layers + 2)
        assert s.requests_put - base.requests_put == 1 + full * (layers + 2)  # + the model record
        # one HEAD per chunk, plus at most one for the model's retirement record
        assert full <= s.requests_head - base.requests_head <= full + 1
        assert s.requests_get == base.requests_get

        before = store.stats()
        again = await store.save_prefix(spec, tokens, _kv(spec, len(tokens)))
        s = store.stats()
        assert (again.chunks_written, again.chunks_skipped, again.objects_written) == (0, full, 0)
        assert s.requests_put == before.requests_put
        assert full <= s.requests_head - before.requests_head <= full + 1

        before = store.stats()
        assert await store.lookup(spec, tokens) == len(tokens)
        s = store.stats()
        assert s.requests_head - before.requests_head == full
        assert (s.requests_get, s.requests_list) == (before.requests_get, before.requests_list)

        before = store.stats()
        hit = await store.load_prefix(spec, tokens)
        s = store.stats()
        assert hit.num_tokens == len(tokens)
        assert s.requests_get - before.requests_get == full * (layers + 1)
        assert (s.requests_head, s.requests_list, s.requests_put) == (
            before.requests_head,
            before.requests_list,
            before.requests_put,
        )

        # A tail chunk costs one more object: its marker.
        before = store.stats()
        tail = await store.save_prefix(spec, [*tokens, 7, 7, 7], _kv(spec, len(tokens) + 3))
        assert (tail.chunks_written, tail.objects_written) == (1, layers + 2 + 1)
        assert store.stats().requests_put - before.requests_put == layers + 2 + 1
