"""Stored chunks are plain zarr v3 data, and docs/FORMAT.md tells the truth about them.

Chunks saved with every codec and dtype are read with ``zarr.open_array`` alone:
one array per model and chunk length, a chunk being the shard at its key's
coordinates (one inner chunk per layer, crc32c that stock zarr checks). Then
every test vector in FORMAT.md is parsed and recomputed — the whole data objects
and their paths from first principles too — and a real store is checked against
the paths, bytes, records and request counts it documents.
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
from kvstore import FormatVersionError, ModelSpec, StoreConfigError
from kvstore.formats import FORMAT_VERSION
from kvstore.formats.codecs import get_codec
from kvstore.formats.keys import ChunkKey, chunk_keys, key_root, model_id, normalize_tokens
from kvstore.formats.layout import (
    ROOT_RECORD,
    array_prefix,
    data_path,
    key_coords,
    metadata_path,
    tail_marker_path,
    zarr_array_metadata,
)
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
    path = root / data_path(model_id(spec), key.digest, key.num_tokens)
    return path, path.read_bytes()


def _array(root: Path, spec: ModelSpec, num_tokens: int) -> zarr.Array:
    """The model's array of ``num_tokens``-token chunks, opened by stock zarr."""
    return zarr.open_array(root / array_prefix(model_id(spec), num_tokens), mode="r")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _stamps(root: Path, paths: Sequence[str]) -> dict[str, tuple[int, bytes]]:
    """Modification time and bytes of each file: what a rewrite would change."""
    return {p: ((root / p).stat().st_mtime_ns, (root / p).read_bytes()) for p in paths}


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
    mid = model_id(spec)
    # Two arrays (lengths 16 and 8), each one zarr.json; a chunk is one object; one tail marker.
    assert _files(tmp_path / "chunks") == sorted(
        [
            f"{mid.hex()}/16/zarr.json",
            f"{mid.hex()}/8/zarr.json",
            *(data_path(mid, k.digest, k.num_tokens).removeprefix("chunks/") for k in keys),
            tail_marker_path(mid, keys[2].parent, 8).removeprefix("chunks/"),
        ]
    )
    for key in keys:
        n = key.num_tokens
        arr = _array(tmp_path, spec, n)
        assert arr.shape == (3, 2, n, 2, 8, 256, 256, 2**52, 2**52)
        assert arr.shards == (3, 2, n, 2, 8, 1, 1, 1, 1)  # one shard per chunk: its data object
        assert arr.chunks == (1, 2, n, 2, 8, 1, 1, 1, 1)  # one inner chunk per layer
        assert str(arr.dtype) == ZARR_DATA_TYPE[dtype_name]
        assert arr.metadata.dimension_names == ("layer", "kv", "token", "head", "dim", "key0", "key1", "key2", "key3")
        assert arr.attrs["kvstore"] == {
            "format": 3,
            "dtype": dtype_name,
            "model": "interop",
            "model_version": "v1",
            "codec": codec,
        }
        coords = key_coords(key.digest)
        data = arr[..., *coords]
        want = _expected_chunk(kv, key.start, key.end)
        assert data.shape == (3, 2, n, 2, 8)
        assert np.array_equal(data, want.view(data.dtype))
        for layer in range(spec.num_layers):
            got_k = _as_torch(arr[layer, 0, :, :, :, *coords], spec.dtype)
            got_v = _as_torch(arr[layer, 1, :, :, :, *coords], spec.dtype)
            assert got_k.dtype == spec.dtype
            assert np.array_equal(_bits(got_k), _bits(kv[layer][0][key.start : key.end]))
            assert np.array_equal(_bits(got_v), _bits(kv[layer][1][key.start : key.end]))
    # A position holding no chunk reads as the fill value, as zarr reads any missing chunk.
    assert not _array(tmp_path, spec, 16)[..., 0, 0, 0, 0].any()


async def test_zarr_reads_the_largest_coordinates_exactly(tmp_path: Path) -> None:
    """A chunk whose key puts it at the top of every key dimension (2^52 - 1: exact in zarr's float64 index
    arithmetic) is read from its own object; a neighbour one step lower reads as missing."""
    spec = ModelSpec("edge", "v1", 1, 1, 2, torch.float16)
    kv = _kv(spec, 4)
    async with kvstore.open(tmp_path, chunk_tokens=4) as store:
        await store.save_prefix(spec, [1, 2, 3, 4], kv)
    (key,) = chunk_keys(spec, normalize_tokens([1, 2, 3, 4]), 4)
    top = b"\xff" * 32
    assert key_coords(top) == (255, 255, 2**52 - 1, 2**52 - 1)
    src = tmp_path / data_path(model_id(spec), key.digest, 4)
    dst = tmp_path / data_path(model_id(spec), top, 4)
    dst.parent.mkdir(parents=True)
    dst.write_bytes(src.read_bytes())  # stock zarr does not read the header: any object at the position
    arr = _array(tmp_path, spec, 4)
    want = _expected_chunk(kv, 0, 4).view(np.float16)
    assert np.array_equal(arr[..., 255, 255, 2**52 - 1, 2**52 - 1], want)
    assert not arr[..., 255, 255, 2**52 - 2, 2**52 - 1].any()
    assert not arr[..., 255, 255, 2**52 - 1, 2**52 - 2].any()


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
    arr = _array(tmp_path, spec, 16)
    coords = key_coords(key.digest)
    assert np.array_equal(arr[target, ..., *coords], _expected_chunk(kv, 0, 16)[target])
    with pytest.raises(ValueError, match="checksum"):
        arr[0, ..., *coords]


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
        arr = _array(tmp_path, spec, 16)
        with pytest.raises(ValueError, match="checksum"):
            arr[1 if where != "index" else 0, ..., *key_coords(key.digest)]
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


def test_the_doc_is_format_3() -> None:
    assert FORMAT_VERSION == 3
    assert FORMAT_MD.read_text(encoding="utf-8").startswith("# kvstore on-store format, version 3\n")


@pytest.mark.parametrize("vid", ["keys-1", "keys-2", "keys-3"])
def test_doc_key_vectors_hold(vid: str) -> None:
    v = _doc_vectors()[vid]
    spec, ct, tokens = _doc_spec(v), v["chunk_tokens"], v["tokens"]
    identity = [spec.name, spec.version, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype_name]
    assert msgpack.packb(identity, use_bin_type=True).hex() == v["identity_msgpack"]
    assert v["key_root_msgpack"].startswith("9803")  # an 8-item array whose first item is the version, 3
    assert msgpack.packb([3, *identity, ct], use_bin_type=True).hex() == v["key_root_msgpack"]
    assert model_id(spec).hex() == v["model_id"]
    assert key_root(spec, ct).hex() == v["key_root"]
    keys = chunk_keys(spec, normalize_tokens(tokens), ct)
    assert [(k.start, k.end, k.hex) for k in keys] == _doc_chunks(v)
    assert blake3.blake3(bytes.fromhex(v["chunk0_preimage"])).hexdigest() == keys[0].hex


def test_doc_record_vectors_hold() -> None:
    vectors = _doc_vectors()
    root = vectors["root-record"]
    rec = RootRecord(root["chunk_tokens"], root["codec"], root["created"])
    assert rec.to_msgpack().hex() == root["bytes"]
    assert RootRecord.from_msgpack(bytes.fromhex(root["bytes"])) == rec
    assert msgpack.unpackb(bytes.fromhex(root["bytes"]))["format"] == 3
    m = vectors["model-record"]
    spec = _doc_spec(m)
    assert model_id(spec).hex() == m["id"]
    mrec = ModelRecord(model_id(spec), spec, m["created"])
    assert mrec.to_msgpack().hex() == m["bytes"]
    assert ModelRecord.from_msgpack(bytes.fromhex(m["bytes"])) == mrec


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


def _doc_coords(key: bytes) -> list[int]:
    """FORMAT.md section 2's key coordinates, by hand: bytes 0 and 1, then the top 52 bits of bytes 2-8 and 9-15."""
    return [key[0], key[1], int(key[2:9].hex(), 16) // 16, int(key[9:16].hex(), 16) // 16]


def test_doc_paths_from_first_principles() -> None:
    """Every documented path of chunk-tiny, rebuilt from FORMAT.md section 2 alone."""
    v = _doc_vectors()["chunk-tiny"]
    mid, parent = v["model_id"], v["key_root"]
    for i, (start, end, key_hex) in enumerate(_doc_chunks(v)):
        key = bytes.fromhex(key_hex)
        n = end - start
        coords = _doc_coords(key)
        assert coords == v[f"chunk[{i}].coords"] == list(key_coords(key))
        assert all(0 <= c < 2**52 for c in coords)
        assert v[f"chunk[{i}].data_path"] == f"chunks/{mid}/{n}/c/0/0/0/0/0/" + "/".join(map(str, coords))
        assert v[f"array[{n}].path"] == f"chunks/{mid}/{n}/zarr.json"
        if n < v["chunk_tokens"]:
            assert v["tail_marker"] == [f"chunks/{mid}/tails/{parent[0:2]}/{parent[2:4]}/{parent}/{n}", key_hex]
        parent = key_hex


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
                "format": 3,
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
        assert check_chunk_head(head, spec, mid, key, "none").name == "none"
        with pytest.raises(kvstore.IntegrityError, match="codec"):  # a store of another codec: damage
            check_chunk_head(head, spec, mid, key, "lz4")
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
            check_chunk_head(head, spec, mid, other, "none")


def test_stock_zarr_reads_the_documented_bytes(tmp_path: Path) -> None:
    """The documented zarr.json and data object, placed at their documented paths, read with stock zarr."""
    v = _doc_vectors()["chunk-tiny"]
    spec, tokens = _doc_spec(v), v["tokens"]
    kv = _tiny_kv(spec, len(tokens))
    meta = tmp_path / v["array[1].path"]
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps(v["array[1].zarr_json"]))
    data = tmp_path / v["chunk[1].data_path"]
    data.parent.mkdir(parents=True)
    data.write_bytes(bytes.fromhex(v["chunk[1].data"]))
    arr = zarr.open_array(meta.parent, mode="r")
    assert np.array_equal(arr[..., *v["chunk[1].coords"]], _expected_chunk(kv, 2, 3).view(np.float16))


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
    assert (root.chunk_tokens, root.codec) == (v["chunk_tokens"], codec)
    assert key_root(spec, v["chunk_tokens"]).hex() == v["key_root"]

    keys = chunk_keys(spec, normalize_tokens(tokens), v["chunk_tokens"])
    assert [(k.start, k.end, k.hex) for k in keys] == _doc_chunks(v)
    for key in keys:
        i = key.index
        assert list(key_coords(key.digest)) == v[f"chunk[{i}].coords"]
        assert data_path(mid, key.digest, key.num_tokens) == v[f"chunk[{i}].data_path"]
        assert metadata_path(mid, key.num_tokens) == v[f"array[{key.num_tokens}].path"]
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
        arr = zarr.open_array(tmp_path / v[f"array[{key.num_tokens}].path"].removesuffix("zarr.json"), mode="r")
        coords = v[f"chunk[{i}].coords"]
        assert np.array_equal(arr[:, 0, ..., *coords], np.stack([k[key.start : key.end].numpy() for k, _ in kv]))
        assert np.array_equal(arr[:, 1, ..., *coords], np.stack([val[key.start : key.end].numpy() for _, val in kv]))

    meta = json.loads((tmp_path / v["array[1].path"]).read_text())
    want = v["array[1].zarr_json"]
    sharding = want["codecs"][0]["configuration"]
    sharding["codecs"] = [*get_codec(codec).zarr_codecs(2), {"name": "crc32c"}]
    want["attributes"]["kvstore"]["codec"] = codec
    assert meta == want

    marker_path, marker_key = v["tail_marker"]
    assert marker_path == tail_marker_path(mid, keys[1].parent, 1)
    assert (tmp_path / marker_path).read_bytes().hex() == marker_key


# ---------------------------------------------------------------------- documented store behaviour


async def test_zarr_json_is_as_documented(tmp_path: Path) -> None:
    spec = ModelSpec("m", "v1", 2, 2, 8, torch.bfloat16)
    async with kvstore.open(tmp_path, codec="blosc-lz4", chunk_tokens=16) as store:
        await store.save_prefix(spec, list(range(20)), _kv(spec, 20))
    meta = json.loads((tmp_path / metadata_path(model_id(spec), 4)).read_text())
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    blosc = {"typesize": 2, "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle", "blocksize": 0}
    assert meta == {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [2, 2, 4, 2, 8, 256, 256, 2**52, 2**52],
        "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 2, 4, 2, 8, 1, 1, 1, 1]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, 2, 4, 2, 8, 1, 1, 1, 1],
                    "codecs": [little, {"name": "blosc", "configuration": blosc}, {"name": "crc32c"}],
                    "index_codecs": [little, {"name": "crc32c"}],
                    "index_location": "start",
                },
            }
        ],
        "attributes": {
            "kvstore": {"format": 3, "dtype": "bfloat16", "model": "m", "model_version": "v1", "codec": "blosc-lz4"}
        },
        "dimension_names": ["layer", "kv", "token", "head", "dim", "key0", "key1", "key2", "key3"],
    }
    assert json.loads(zarr_array_metadata(spec, 4, "blosc-lz4")) == meta


@pytest.mark.parametrize("codec", CODECS)
async def test_documented_request_counts(store_url: Any, backend: str, codec: str) -> None:
    """FORMAT.md section 10: per chunk, save 1 HEAD + 1 PUT (+ one PUT of each new array's zarr.json, once per
    open store), whole load 1 HEAD + 1 GET, layer-pipelined load 1 HEAD + 2 ranged GETs; a local directory
    reads with pread + preadv in the same request counts."""
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
        assert (saved.chunks_written, saved.objects_written) == (full, full + 1)  # + the array's zarr.json
        assert st.requests_put - base.requests_put == 2 + full  # + the model record and the zarr.json
        assert full <= st.requests_head - base.requests_head <= full + 1  # + the retirement check
        assert st.requests_get == base.requests_get

        before = s.stats()
        again = await s.save_prefix(spec, tokens, kv)
        st = s.stats()
        assert (again.chunks_written, again.chunks_skipped, again.objects_written) == (0, full, 0)
        assert st.requests_put == before.requests_put
        assert full <= st.requests_head - before.requests_head <= full + 1

        # Another prompt in the same array: one PUT per chunk, its zarr.json is not written again.
        before = s.stats()
        other = await s.save_prefix(spec, [t + 1000 for t in tokens], kv)
        st = s.stats()
        assert (other.chunks_written, other.objects_written) == (full, full)
        assert st.requests_put - before.requests_put == full

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

        # A tail chunk costs one more object, its marker; the first tail of a length, its array's zarr.json too.
        before = s.stats()
        tail = await s.save_prefix(spec, [*tokens, 7, 7, 7], _kv(spec, len(tokens) + 3))
        assert (tail.chunks_written, tail.objects_written) == (1, 3)
        assert s.stats().requests_put - before.requests_put == 3
        before = s.stats()
        tail = await s.save_prefix(spec, [*tokens, 8, 8, 8], _kv(spec, len(tokens) + 3))
        assert (tail.chunks_written, tail.objects_written) == (1, 2)
        assert s.stats().requests_put - before.requests_put == 2


async def test_zarr_json_is_written_once_per_array_not_per_chunk(tmp_path: Path) -> None:
    """Each array's zarr.json is PUT create-only once per open store, before its first data object; another
    open store PUTs it once more (refused: it is there), and never rewrites it."""
    spec = ModelSpec("m", "v1", 2, 2, 8, torch.float16)
    mid = model_id(spec)
    prompts = [[p * 100 + t for t in range(40)] for p in range(3)]  # each: 2 full chunks of 16 and a tail of 8
    async with kvstore.open(tmp_path, chunk_tokens=16) as store:
        for tokens in prompts:
            await store.save_prefix(spec, tokens, _kv(spec, 40))
    metas = [f for f in _files(tmp_path) if f.endswith("/zarr.json")]
    assert metas == [metadata_path(mid, 16), metadata_path(mid, 8)]
    first = _stamps(tmp_path, metas)
    assert len(_files(tmp_path / array_prefix(mid, 16))) == 1 + 6  # its zarr.json and 6 data objects

    async with kvstore.open(tmp_path) as store:
        before = store.stats()
        saved = await store.save_prefix(spec, [900 + t for t in range(40)], _kv(spec, 40))
        st = store.stats()
    assert (saved.chunks_written, saved.objects_written) == (3, 4)  # 3 data objects and a tail marker
    assert st.requests_put - before.requests_put == 1 + 2 + 3 + 1  # model record, 2 zarr.json, chunks, marker
    assert _stamps(tmp_path, metas) == first


async def test_the_store_codec_is_fixed_at_creation(tmp_path: Path) -> None:
    """FORMAT.md section 5.1: the root record names the store's codec; None adopts it, another one is refused."""
    async with kvstore.open(tmp_path, codec="lz4") as store:
        assert RootRecord.from_msgpack((tmp_path / ROOT_RECORD).read_bytes()).codec == "lz4"
    async with kvstore.open(tmp_path) as store:
        spec = ModelSpec("m", "v1", 1, 1, 4, torch.float16)
        await store.save_prefix(spec, list(range(256)), _kv(spec, 256))
    (key,) = chunk_keys(spec, normalize_tokens(list(range(256))), 256)
    _, data = _stored_head(tmp_path, spec, key)
    assert parse_head(data, 1, len(data)).header.codec == "lz4"
    with pytest.raises(StoreConfigError, match="codec"):
        await kvstore.open(tmp_path, codec="none")


@pytest.mark.parametrize("old", [1, 2])
async def test_a_store_of_an_older_version_is_refused_naming_both_versions(tmp_path: Path, old: int) -> None:
    root = {"format": old, "magic": "kvstore", "chunk_tokens": 256, "created": 1700000000.0}
    (tmp_path / ROOT_RECORD).write_bytes(msgpack.packb(root))
    with pytest.raises(FormatVersionError, match=rf"version {old}\b.*version 3\b"):
        await kvstore.open(tmp_path)
