"""Atheris harness for the layer decoders (none, lz4, blosc-lz4): hostile headers, sizes and bodies.

Run: ``python fuzz/fuzz_codecs.py -atheris_runs=100000``. A decode either raises
IntegrityError or returns exactly the declared size; it never allocates more
than that size (the caller's spec bounds it) whatever a header claims.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["kvstore"]):
    from kvstore.errors import KVStoreError
    from kvstore.formats.codecs import CODEC_NAMES, get_codec

from _harness import fuzz

_MAX_NBYTES = 1 << 16


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    name = fdp.PickValueInList(list(CODEC_NAMES))
    codec = get_codec(name, stored=True)
    nbytes = fdp.ConsumeIntInRange(0, _MAX_NBYTES)
    itemsize = fdp.PickValueInList([1, 2, 4])
    if fdp.ConsumeBool():  # a real encoding, then damaged: reaches the decompressors' inner paths
        plain = fdp.ConsumeBytes(min(nbytes, fdp.remaining_bytes() // 2))
        plain = plain[: len(plain) - len(plain) % itemsize]  # writers encode whole elements
        encoded = bytearray(codec.encode([memoryview(plain)], itemsize))
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            if encoded:
                encoded[fdp.ConsumeIntInRange(0, len(encoded) - 1)] = fdp.ConsumeInt(1) & 0xFF
        cut = fdp.ConsumeIntInRange(0, len(encoded))
        payload = bytes(encoded[:cut]) if fdp.ConsumeBool() else bytes(encoded)
        nbytes = len(plain) if fdp.ConsumeBool() else nbytes
    else:
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        out = codec.decode(payload, nbytes)
    except KVStoreError:
        return
    assert len(out) == nbytes


if __name__ == "__main__":
    fuzz(test_one)
