"""Stored chunks are plain zarr v3 arrays, and docs/FORMAT.md tells the truth about them.

Chunks saved with every codec and dtype are opened with ``zarr.open_array`` alone
(one shard per chunk, one inner chunk per layer, crc32c that stock zarr checks);
then every test vector in FORMAT.md is parsed and recomputed — the whole data
objects from first principles too — and a real store is checked against the
paths, bytes, records and request counts it documents.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3
import google_crc32c
import msgpack
import numpy as np
import pytest
import torch
import zarr

import kvstore
from kvstore import FormatVersionError, ModelSpec
from kvstore.formats import FORMAT_VERSION
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import ChunkKey, chunk_keys, key_root, model_id, normalize_tokens
from kvstore.formats.layout import ROOT_RECORD, chunk_prefix, data_path, tails_prefix, zarr_array_metadata
from kvstore.formats.records import ModelRecord, RootRecord
from kvstore.formats.shard import crc32c, data_object, decode_layer, head_bytes, parse_head
from kvstore.reading import check_chunk_head

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


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _stored_head(root: Path, spec: ModelSpec, key: ChunkKey) -> tuple[Path, bytes]:
    path = root / data_path(chunk_prefix(model_id(spec), key.digest))
    return path, path.read_bytes()


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
        prefix = tmp_path / chunk_prefix(model_id(spec), key.digest)
        assert sorted(p.name for p in prefix.iterdir() if p.is_file()) == ["c.0.0.0.0.0", "zarr.json"]
        arr = zarr.open_array(prefix, mode="r")
        assert arr.shape == (3, 2, key.num_tokens, 2, 8)
        assert arr.shards == arr.shape  # one shard: the data object
        assert arr.chunks == (1, 2, key.num_tokens, 2, 8)  # one inner chunk per layer
        assert str(arr.dtype) == ZARR_DATA_TYPE[dtype_name]
        assert arr.metadata.dimension_names == ("layer", "kv", "token", "head", "dim")
        assert arr.attrs["kvstore"] == {
            "format": 2,
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
    """One inner chunk per layer: reading arr[l] touches (and checks) only layer l's byte range."""
    spec = ModelSpec("interop", "v1", 4, 2, 8, torch.bfloat16)
    kv = _kv(spec, 16, seed=3)
    async with kvstore.open(tmp_path, codec=codec, chunk_tokens=16) as store:
        await store.save_prefix(spec, list(range(16)), kv)
    (key,) = chunk_keys(spec, normalize_tokens(list(range(16))), 16)
    path, data = _stored_head(tmp_path, spec, key)
    head = parse_head(data, spec.num_layers, len(data))
    target = 2
    for layer, span in enumerate(head.spans):
        if layer != target:  # every other layer is damaged in the middle of its bytes
            _flip(path, span.offset + span.nbytes // 2)
    arr = zarr.open_array(path.parent, mode="r")
    assert np.array_equal(arr[target], _expected_chunk(kv, 0, 16)[target])
    with pytest.raises(ValueError, match="checksum"):
        arr[0]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("where", ["first-byte", "middle", "own-crc", "index"])
async def test_damage_makes_stock_zarr_raise_and_kvstore_miss(tmp_path: Path, codec: str, where: str) -> None:
    """One flipped bit in a layer (or its crc32c, or the shard index): zarr's crc32c codec refuses the
    read, and kvstore reports the chunk damaged and returns nothing of it."""
    spec = ModelSpec("interop", "v1", 2, 2, 8, torch.float16)
    tokens = list(range(16))
    kv = _kv(spec, 16, seed=5)
    async with kvstore.open(tmp_path, codec=codec, chunk_tokens=16, repair=False) as store:
        await store.save_prefix(spec, tokens, kv)
        (key,) = chunk_keys(spec, normalize_tokens(tokens), 16)
        path, data = _stored_head(tmp_path, spec, key)
        span = parse_head(data, spec.num_layers, len(data)).spans[1]
        offset = {"first-byte": span.offset, "middle": span.offset + span.nbytes // 2, "own-crc": span.end - 1}
        _flip(path, offset.get(where, 3))  # "index": the first entry's offset field
        arr = zarr.open_array(path.parent, mode="r")
        with pytest.raises(ValueError, match="checksum"):
            arr[1] if where != "index" else arr[0]
        hit = await store.load_prefix(spec, tokens)
        assert (hit.num_tokens, hit.chunks_damaged) == (0, 1)
        assert await store.lookup(spec, tokens) == 16  # lookup reads no bytes: the object is present


# ---------------------------------------------------------------------- FORMAT.md test vectors


def _doc_vectors() -> dict[str, dict[str, Any]]:
    """Every ``vector:`` block of the "Test vectors" section, values parsed as JSON."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    section = text.split("\n## Test vectors", 1)[1].split("\n## Appendix", 1)[0]
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
    assert set(_doc_vectors()) == {
        "keys-1", "keys-2", "keys-3", "root-record", "model-record", "access-record", "chunk-tiny",
    }  # fmt: skip


def test_the_doc_is_format_2() -> None:
    assert FORMAT_VERSION == 2
    assert FORMAT_MD.read_text(encoding="utf-8").startswith("# kvstore on-store format, version 2\n")


@pytest.mark.parametrize("vid", ["keys-1", "keys-2", "keys-3"])
def test_doc_key_vectors_hold(vid: str) -> None:
    v = _doc_vectors()[vid]
    spec, ct, tokens = _doc_spec(v), v["chunk_tokens"], v["tokens"]
    identity = [spec.name, spec.version, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype_name]
    assert msgpack.packb(identity, use_bin_type=True).hex() == v["identity_msgpack"]
    assert v["key_root_msgpack"].startswith("9802")  # an 8-item array whose first item is the version, 2
    assert msgpack.packb([2, *identity, ct], use_bin_type=True).hex() == v["key_root_msgpack"]
    assert model_id(spec).hex() == v["model_id"]
    assert key_root(spec, ct).hex() == v["key_root"]
    keys = chunk_keys(spec, normalize_tokens(tokens), ct)
    assert [(k.start, k.end, k.hex) for k in keys] == _doc_chunks(v)
    assert blake3.blake3(bytes.fromhex(v["chunk0_preimage"])).hexdigest() == keys[0].hex


def test_doc_record_vectors_hold() -> None:
    vectors = _doc_vectors()
    root = vectors["root-record"]
    assert RootRecord(root["chunk_tokens"], root["created"]).to_msgpack().hex() == root["bytes"]
    assert msgpack.unpackb(bytes.fromhex(root["bytes"]))["format"] == 2
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


def _crc(data: bytes) -> bytes:
    """u32le(crc32c(data)), straight from google_crc32c (not the library's helper)."""
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def test_crc32c_is_castagnoli() -> None:
    """The check value FORMAT.md section 1 gives, from both the reference and the library."""
    assert google_crc32c.value(b"123456789") == 0xE3069283
    assert crc32c([b"1234", memoryview(b"56789")]) == 0xE3069283


def test_doc_data_objects_from_first_principles() -> None:
    """Rebuild each documented data object from FORMAT.md section 6.1's table alone: index, crc, header, crc,
    then every layer's stored bytes and crc. Only msgpack, struct and crc32c are used."""
    v = _doc_vectors()["chunk-tiny"]
    spec, tokens = _doc_spec(v), v["tokens"]
    kv = _tiny_kv(spec, len(tokens))
    parent = bytes.fromhex(v["key_root"])
    for i, (start, end, key_hex) in enumerate(_doc_chunks(v)):
        key = bytes.fromhex(key_hex)
        inner = []
        for layer in range(spec.num_layers):
            decoded = bytes.fromhex(v[f"chunk[{i}].layer[{layer}].decoded"])
            k, val = kv[layer]
            assert decoded == k[start:end].numpy().tobytes() + val[start:end].numpy().tobytes()
            assert v[f"chunk[{i}].layer[{layer}].none"] == (decoded + _crc(decoded)).hex()
            for codec in ("lz4", "blosc-lz4"):
                stored = bytes.fromhex(v[f"chunk[{i}].layer[{layer}].{codec}"])
                assert _crc(stored[:-4]) == stored[-4:]
                assert bytes(get_codec(codec).decode(stored[:-4], len(decoded))) == decoded
            inner.append(decoded + _crc(decoded))
        header = msgpack.packb(
            {
                "format": 2,
                "key": key,
                "parent": parent,
                "index": i,
                "model": bytes.fromhex(v["model_id"]),
                "tokens": end - start,
                "layers": spec.num_layers,
                "codec": "none",
                "crcs": b"".join(chunk[-4:] for chunk in inner),
                "created": v["created"],
            },
            use_bin_type=True,
        )
        assert header.hex() == v[f"chunk[{i}].header"]
        frame = header + _crc(header)
        offset = 16 * len(inner) + 4 + len(frame)
        index = b""
        for chunk in inner:
            index += struct.pack("<QQ", offset, len(chunk))
            offset += len(chunk)
        assert (index + _crc(index) + frame + b"".join(inner)).hex() == v[f"chunk[{i}].data"]
        parent = key


def test_doc_data_objects_parse_with_the_library() -> None:
    v = _doc_vectors()["chunk-tiny"]
    spec, tokens = _doc_spec(v), v["tokens"]
    mid = model_id(spec)
    keys = chunk_keys(spec, normalize_tokens(tokens), v["chunk_tokens"])
    for key in keys:
        i = key.index
        data = bytes.fromhex(v[f"chunk[{i}].data"])
        assert len(data) < head_bytes(spec.num_layers)  # a reader's first range holds all of it
        head = parse_head(data, spec.num_layers, len(data))
        assert head.header.to_msgpack().hex() == v[f"chunk[{i}].header"]
        assert check_chunk_head(head, spec, mid, key).name == "none"
        assert head.contiguous()
        assert head.spans[-1].end == len(data)
        layers = [data[s.offset : s.end] for s in head.spans]
        assert [x.hex() for x in layers] == [v[f"chunk[{i}].layer[{n}].none"] for n in range(spec.num_layers)]
        for n, stored in enumerate(layers):
            decoded = bytes.fromhex(v[f"chunk[{i}].layer[{n}].decoded"])
            out = np.zeros(len(decoded), np.uint8)
            half = len(decoded) // 2
            crc = head.header.layer_crc(n)
            assert crc == stored[-4:]
            decode_layer(get_codec("none"), memoryview(stored), (out[:half], out[half:]), crc, verify=True)
            assert out.tobytes() == decoded
        assert b"".join(bytes(p) for p in data_object(head.header, [[x[:-4], x[-4:]] for x in layers])) == data
        # Another chunk's object under this key is damage, however sound its bytes.
        other = keys[1 - i]
        with pytest.raises(kvstore.IntegrityError):
            check_chunk_head(head, spec, mid, other)


def test_stock_zarr_reads_the_documented_bytes(tmp_path: Path) -> None:
    v = _doc_vectors()["chunk-tiny"]
    spec, tokens = _doc_spec(v), v["tokens"]
    kv = _tiny_kv(spec, len(tokens))
    (tmp_path / "zarr.json").write_text(json.dumps(v["chunk[1].zarr_json"]))
    (tmp_path / "c.0.0.0.0.0").write_bytes(bytes.fromhex(v["chunk[1].data"]))
    arr = zarr.open_array(tmp_path, mode="r")
    assert np.array_equal(arr[:], _expected_chunk(kv, 2, 3).view(np.float16))


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
    assert ModelRecord.from_msgpack((tmp_path / v["model_record"]).read_bytes()).spec == spec
    root = RootRecord.from_msgpack((tmp_path / ROOT_RECORD).read_bytes())
    assert root.chunk_tokens == v["chunk_tokens"]
    assert key_root(spec, v["chunk_tokens"]).hex() == v["key_root"]

    keys = chunk_keys(spec, normalize_tokens(tokens), v["chunk_tokens"])
    assert [(k.start, k.end, k.hex) for k in keys] == _doc_chunks(v)
    for key in keys:
        i = key.index
        prefix = v[f"chunk[{i}].prefix"]
        assert chunk_prefix(mid, key.digest) == prefix
        assert data_path(prefix) == v[f"chunk[{i}].data_path"]
        stored = (tmp_path / v[f"chunk[{i}].data_path"]).read_bytes()
        head = parse_head(stored, spec.num_layers, len(stored))
        h = head.header
        assert (h.key, h.parent, h.index) == (key.digest, key.parent, i)
        assert (h.model_id, h.num_tokens, h.num_layers, h.codec) == (mid, key.num_tokens, spec.num_layers, codec)
        assert [stored[s.offset : s.end].hex() for s in head.spans] == [
            v[f"chunk[{i}].layer[{n}].{codec}"] for n in range(spec.num_layers)
        ]
        # The writer's own time is the only difference from the documented object.
        fixed = dataclasses.replace(h, created=v["created"])
        layers = [[stored[s.offset : s.end - 4], stored[s.end - 4 : s.end]] for s in head.spans]
        assert b"".join(bytes(p) for p in data_object(h, layers)) == stored
        if codec == "none":
            assert b"".join(bytes(p) for p in data_object(fixed, layers)).hex() == v[f"chunk[{i}].data"]
            assert fixed.to_msgpack().hex() == v[f"chunk[{i}].header"]
        arr = zarr.open_array(tmp_path / prefix, mode="r")
        assert np.array_equal(arr[:, 0], np.stack([k[key.start : key.end].numpy() for k, _ in kv]))
        assert np.array_equal(arr[:, 1], np.stack([val[key.start : key.end].numpy() for _, val in kv]))

    meta = json.loads((tmp_path / v["chunk[1].prefix"] / "zarr.json").read_text())
    want = v["chunk[1].zarr_json"]
    sharding = want["codecs"][0]["configuration"]
    sharding["codecs"] = [*get_codec(codec).zarr_codecs(2), {"name": "crc32c"}]
    want["attributes"]["kvstore"]["codec"] = codec
    assert meta == want

    marker_path, marker_key = v["tail_marker"]
    assert marker_path == f"{tails_prefix(mid, keys[1].parent)}1"
    assert (tmp_path / marker_path).read_bytes().hex() == marker_key


# ---------------------------------------------------------------------- documented store behaviour


async def test_zarr_json_is_as_documented(tmp_path: Path) -> None:
    spec = ModelSpec("m", "v1", 2, 2, 8, torch.bfloat16)
    async with kvstore.open(tmp_path, codec="blosc-lz4", chunk_tokens=16) as store:
        await store.save_prefix(spec, list(range(20)), _kv(spec, 20))
    key = chunk_keys(spec, normalize_tokens(list(range(20))), 16)[1]
    meta = json.loads((tmp_path / chunk_prefix(model_id(spec), key.digest) / "zarr.json").read_text())
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    blosc = {"typesize": 2, "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle", "blocksize": 0}
    assert meta == {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [2, 2, 4, 2, 8],
        "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 2, 4, 2, 8]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, 2, 4, 2, 8],
                    "codecs": [little, {"name": "blosc", "configuration": blosc}, {"name": "crc32c"}],
                    "index_codecs": [little, {"name": "crc32c"}],
                    "index_location": "start",
                },
            }
        ],
        "attributes": {
            "kvstore": {"format": 2, "dtype": "bfloat16", "model": "m", "model_version": "v1", "codec": "blosc-lz4"}
        },
        "dimension_names": ["layer", "kv", "token", "head", "dim"],
    }
    assert json.loads(zarr_array_metadata(spec, 4, "blosc-lz4")) == meta


@pytest.mark.parametrize("codec", CODECS)
async def test_documented_request_counts(store_url: Any, backend: str, codec: str) -> None:
    """FORMAT.md section 10: per chunk, save 1 HEAD + 2 PUTs, whole load 1 HEAD + 1 GET, layer-pipelined
    load 1 HEAD + 2 ranged GETs; a local directory reads with pread + preadv in the same request counts."""
    layers, full = 3, 4
    spec = ModelSpec("m", "v1", layers, 4, 64, torch.float16)  # 16 KiB per layer: a first range cannot hold all
    tokens = list(range(16 * full))
    kv = _kv(spec, len(tokens))
    async with kvstore.open(
        store_url.url, storage_options=store_url.storage_options, codec=codec, chunk_tokens=16
    ) as s:
        base = s.stats()
        saved = await s.save_prefix(spec, tokens, kv)
        st = s.stats()
        assert (saved.chunks_written, saved.objects_written) == (full, 2 * full)
        assert st.requests_put - base.requests_put == 1 + 2 * full  # + the model record
        assert full <= st.requests_head - base.requests_head <= full + 1  # + the retirement check
        assert st.requests_get == base.requests_get

        before = s.stats()
        again = await s.save_prefix(spec, tokens, kv)
        st = s.stats()
        assert (again.chunks_written, again.chunks_skipped, again.objects_written) == (0, full, 0)
        assert st.requests_put == before.requests_put
        assert full <= st.requests_head - before.requests_head <= full + 1

        before = s.stats()
        assert await s.lookup(spec, tokens) == len(tokens)
        st = s.stats()
        assert st.requests_head - before.requests_head == full
        assert (st.requests_get, st.requests_list) == (before.requests_get, before.requests_list)

        before = s.stats()
        hit = await s.load_prefix(spec, tokens)
        st = s.stats()
        assert hit.num_tokens == len(tokens)
        assert st.requests_head - before.requests_head == full
        assert st.requests_get - before.requests_get == full  # one GET, or (local) pread + preadv in one call
        assert (st.requests_list, st.requests_put) == (before.requests_list, before.requests_put)

        before = s.stats()
        async with s.load_prefix_layers(spec, tokens) as stream:
            got = [layer async for layer, _, _ in stream]
        st = s.stats()
        assert got == list(range(layers))
        assert st.requests_head - before.requests_head == full
        # two ranged GETs; local: the head and layer 0 in one call, then the rest
        assert st.requests_get - before.requests_get == full * 2

        # A tail chunk costs one more object: its marker.
        before = s.stats()
        tail = await s.save_prefix(spec, [*tokens, 7, 7, 7], _kv(spec, len(tokens) + 3))
        assert (tail.chunks_written, tail.objects_written) == (1, 3)
        assert s.stats().requests_put - before.requests_put == 3


async def test_a_version_1_store_is_refused_naming_both_versions(tmp_path: Path) -> None:
    v1_root = {"format": 1, "magic": "kvstore", "chunk_tokens": 256, "created": 1700000000.0}
    (tmp_path / ROOT_RECORD).write_bytes(msgpack.packb(v1_root))
    with pytest.raises(FormatVersionError, match=r"version 1\b.*version 2\b"):
        await kvstore.open(tmp_path)
