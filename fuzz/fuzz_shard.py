"""Atheris harness for a chunk's data object: ``parse_head`` and the layer checks on damaged or hostile bytes.

Run: ``python fuzz/fuzz_shard.py -atheris_runs=100000``. Half the inputs are a
valid data object (every codec) with bytes flipped, spliced or cut off, half an
object whose index (with a matching crc32c) or header is replaced by hostile
values, so the bounds checks behind the checksums are reached too. A reader may
only raise kvstore's own errors, and what it accepts must lie inside the object.
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["kvstore"]):
    import msgpack
    import numpy as np
    import torch

    from kvstore.errors import KVStoreError
    from kvstore.formats.codecs import CODEC_NAMES, get_codec
    from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
    from kvstore.formats.records import ChunkHeader
    from kvstore.formats.shard import CRC_BYTES, crc32c, data_object, decode_layer, encode_layers, parse_head
    from kvstore.reading import check_chunk_head
    from kvstore.spec import ModelSpec

from _harness import fuzz, mutate_record

_SPEC = ModelSpec("tiny", "v1", num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
_MID = model_id(_SPEC)
(_KEY,) = chunk_keys(_SPEC, normalize_tokens(list(range(4))), 4)
_RAW = 2 * _KEY.num_tokens * _SPEC.row_bytes


def _valid(codec: str) -> bytes:
    rng = np.random.default_rng(0)
    layers = [(rng.bytes(_RAW // 2), rng.bytes(_RAW // 2)) for _ in range(_SPEC.num_layers)]
    header = ChunkHeader(_KEY.digest, _KEY.parent, _KEY.index, _MID, _KEY.num_tokens, _SPEC.num_layers, codec)
    stored = encode_layers(get_codec(codec), [(memoryview(k), memoryview(v)) for k, v in layers], 2)
    return b"".join(bytes(p) for p in data_object(header, stored))


_VALID = [_valid(codec) for codec in CODEC_NAMES]
_HEADER = msgpack.unpackb(parse_head(_VALID[0], _SPEC.num_layers, len(_VALID[0])).header.to_msgpack())
_N_INDEX = 16 * _SPEC.num_layers + CRC_BYTES


def _crc(data: bytes) -> bytes:
    return crc32c([data]).to_bytes(CRC_BYTES, "little")


def _hostile(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A header replaced by a mutated one, or an index of arbitrary entries, both with valid checksums."""
    data = _VALID[0]
    first = struct.unpack_from("<Q", data, 0)[0]
    if fdp.ConsumeBool():
        body = msgpack.packb(mutate_record(fdp, _HEADER), use_bin_type=True)
        frame = body + _crc(body)
        shift = len(frame) - (first - _N_INDEX)
        entries = [struct.unpack_from("<QQ", data, 16 * i) for i in range(_SPEC.num_layers)]
        index = b"".join(struct.pack("<QQ", max(o + shift, 0), n) for o, n in entries)
        return index + _crc(index) + frame + data[first:]
    index = b"".join(
        struct.pack("<QQ", fdp.ConsumeIntInRange(0, 2**64 - 1), fdp.ConsumeIntInRange(0, 2**64 - 1))
        for _ in range(_SPEC.num_layers)
    )
    return index + _crc(index) + data[_N_INDEX:]


def _damaged(fdp: atheris.FuzzedDataProvider) -> bytes:
    data = bytearray(fdp.PickValueInList(_VALID))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        data[fdp.ConsumeIntInRange(0, len(data) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
    if fdp.ConsumeBool():
        at = fdp.ConsumeIntInRange(0, len(data))
        data[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
    return bytes(data[: fdp.ConsumeIntInRange(0, len(data))] if fdp.ConsumeBool() else data)


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 2)
    payload = _damaged(fdp) if kind == 0 else _hostile(fdp) if kind == 1 else fdp.ConsumeBytes(4096)
    size = len(payload) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**40)
    try:
        head = parse_head(payload, _SPEC.num_layers, size)
        for span in head.spans:
            assert head.data_start <= span.offset
            assert span.nbytes > CRC_BYTES
            assert span.end <= size
        codec = check_chunk_head(head, _SPEC, _MID, _KEY, head.header.codec)
        if size != len(payload):
            return
        out = np.zeros(_RAW, np.uint8)
        for layer, span in enumerate(head.spans):
            stored = memoryview(payload)[span.offset : span.end]
            expected = head.header.layer_crc(layer)
            decode_layer(codec, stored, (out[: _RAW // 2], out[_RAW // 2 :]), expected, verify=fdp.ConsumeBool())
    except KVStoreError:
        return


if __name__ == "__main__":
    fuzz(test_one)
