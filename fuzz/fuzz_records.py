"""Atheris harness for the msgpack record decoders (root, model, chunk header, retirement) and tail markers.

Run: ``python fuzz/fuzz_records.py -atheris_runs=100000``. Half the inputs are
raw bytes, half a valid record with fields replaced by hostile values, so the
schema checks behind the msgpack parser are reached too.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["kvstore"]):
    import msgpack
    import torch

    from kvstore.errors import KVStoreError
    from kvstore.formats.keys import model_id
    from kvstore.formats.layout import parse_tail_marker
    from kvstore.formats.records import ChunkHeader, ModelRecord, RetirementRecord, RootRecord
    from kvstore.spec import ModelSpec

from _harness import fuzz, mutate_record

_SPEC = ModelSpec("tiny", "v1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
_MID = model_id(_SPEC)
_SAMPLES = [
    (RootRecord, RootRecord(256, created=1.0).to_msgpack()),
    (ModelRecord, ModelRecord(_MID, _SPEC, created=1.0).to_msgpack()),
    (
        ChunkHeader,
        ChunkHeader(b"k" * 32, b"p" * 32, 0, _MID, 16, 2, "none", layer_crcs=b"c" * 8, created=1.0).to_msgpack(),
    ),
    (RetirementRecord, RetirementRecord(_MID, retired_by="ops", reason="why", retired_at=1.0).to_msgpack()),
]
_FIELDS = [msgpack.unpackb(data) for _, data in _SAMPLES]


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(_SAMPLES))
    if which == len(_SAMPLES):
        marker = parse_tail_marker(fdp.ConsumeUnicodeNoSurrogates(40))
        assert marker is None or 0 <= marker < 10**8
        return
    cls, _ = _SAMPLES[which]
    if fdp.ConsumeBool():
        payload = msgpack.packb(mutate_record(fdp, _FIELDS[which]), use_bin_type=True)
    else:
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        record = cls.from_msgpack(payload)
    except KVStoreError:
        return
    assert cls.from_msgpack(record.to_msgpack()) == record  # whatever is accepted round-trips


if __name__ == "__main__":
    fuzz(test_one)
