"""Chunk keys and model ids: golden vectors, canonical msgpack, and the properties of the chain.

The literal values below are the test vectors of docs/FORMAT.md. Any change to them is
a change of the on-store format: every existing store would stop hitting.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import blake3
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvstore import InvalidInputError, ModelSpec
from kvstore.formats import FORMAT_VERSION
from kvstore.formats.dtypes import supported_dtype_names
from kvstore.formats.keys import (
    KEY_DOMAIN,
    MODEL_ID_DOMAIN,
    chunk_keys,
    key_root,
    model_id,
    next_key,
    normalize_tokens,
)
from kvstore.spec import MAX_DIM, MAX_LAYERS

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}

# ---------------------------------------------------------------------- golden vectors (docs/FORMAT.md)

VECTORS = {
    "keys-1": {
        "spec": ModelSpec("llama-3.1-8b-instruct", "main", 32, 8, 128, torch.bfloat16),
        "chunk_tokens": 16,
        "tokens": list(range(40)),
        "identity_msgpack": "96b56c6c616d612d332e312d38622d696e737472756374a46d61696e2008cc80a862666c6f61743136",
        "model_id": "0427799c745f141ec324eb33cbfae430",
        "key_root_msgpack": "9803b56c6c616d612d332e312d38622d696e737472756374a46d61696e2008cc80a862666c6f6174313610",
        "key_root": "1bb9875a7b04df53b2ccc2aa4bdfc90ff39c2a738bbb09e4d6e3cbc56e2eb7fa",
        "chunks": [
            (0, 16, "31ccb13e61fc7b5a9ddd5704d6056d4a2b0e7212fe2b972974c657cd0d33b8e8"),
            (16, 32, "d357b74639b83f60b614d17dd0ee34a59c47849b321682fe7c5e6f0de2a1a6c4"),
            (32, 40, "b318a158666741e6e6d550b2e6ce8f1df824d5a7738698a5071b56aaacd2c8a8"),
        ],
    },
    "keys-2": {
        "spec": ModelSpec("Qwen2.5/日本語-ü", "2024-09 β", 80, 8, 128, torch.float8_e4m3fn),
        "chunk_tokens": 4,
        "tokens": [0, 1, 255, 256, 65535, 65536, 16777216, 4294967295, 151643, 7],
        "identity_msgpack": (
            "96b45177656e322e352fe697a5e69cace8aa9e2dc3bcaa323032342d303920ceb25008cc80ad666c6f6174385f65346d33666e"
        ),
        "model_id": "482f55dc4f348e3403f32e92a1684471",
        "key_root_msgpack": (
            "9803b45177656e322e352fe697a5e69cace8aa9e2dc3bcaa323032342d303920ceb25008cc80ad666c6f6174385f65346d33666e04"
        ),
        "key_root": "7a3ad037afa2cdc16456f514d4c31f0483cdb3828f05bd64274f1d05abac07d2",
        "chunks": [
            (0, 4, "e4082814fbfaa89187bc4f185a5d2d54488e0a5f2102c0fbd881915409aaae07"),
            (4, 8, "d2d6779f3e2ccbc801d83eec038a344a4db4ef5312e01fa7169ceaaff09b3df4"),
            (8, 10, "f021de91d8e19d87430caf3a520f0b1e856d3549831f5a782e24da6f9d276da2"),
        ],
    },
    "keys-3": {
        "spec": ModelSpec("a-model-name-that-is-longer-than-31-bytes", "v1", 200, 1000, 70000, torch.float32),
        "chunk_tokens": 65536,
        "tokens": [1, 2, 3],
        "identity_msgpack": (
            "96d929612d6d6f64656c2d6e616d652d746861742d69732d6c6f6e6765722d7468616e2d33312d6279746573"
            "a27631ccc8cd03e8ce00011170a7666c6f61743332"
        ),
        "model_id": "80eec78aa9ae99480fc9fe7488b197c9",
        "key_root_msgpack": (
            "9803d929612d6d6f64656c2d6e616d652d746861742d69732d6c6f6e6765722d7468616e2d33312d6279746573"
            "a27631ccc8cd03e8ce00011170a7666c6f61743332ce00010000"
        ),
        "key_root": "ba15623276e4a17739186af4ecd8dda516036218852dc5e22b96474f7f366585",
        "chunks": [(0, 3, "38ba68af4c96ca09bbb93eddf963015697efae10b4d76030cfdcb32946c21c88")],
    },
}


def _keys_hex(spec: ModelSpec, tokens: object, chunk_tokens: int, *, include_tail: bool = True) -> list[str]:
    return [k.hex for k in chunk_keys(spec, normalize_tokens(tokens), chunk_tokens, include_tail=include_tail)]


def test_format_version_and_domain_strings() -> None:
    assert FORMAT_VERSION == 3
    assert KEY_DOMAIN == b"kvstore/chunk-key/v1\x00"
    assert MODEL_ID_DOMAIN == b"kvstore/model-id/v1\x00"
    assert KEY_DOMAIN.hex() == "6b7673746f72652f6368756e6b2d6b65792f763100"
    assert MODEL_ID_DOMAIN.hex() == "6b7673746f72652f6d6f64656c2d69642f763100"


@pytest.mark.parametrize("vid", sorted(VECTORS))
def test_golden_vector(vid: str) -> None:
    v = VECTORS[vid]
    spec, ct, tokens = v["spec"], v["chunk_tokens"], v["tokens"]
    assert model_id(spec).hex() == v["model_id"]
    assert key_root(spec, ct).hex() == v["key_root"]
    keys = chunk_keys(spec, normalize_tokens(tokens), ct)
    assert [(k.start, k.end, k.hex) for k in keys] == v["chunks"]
    assert [k.index for k in keys] == list(range(len(keys)))
    assert keys[0].parent.hex() == v["key_root"]
    for prev, key in itertools.pairwise(keys):
        assert key.parent == prev.digest


@pytest.mark.parametrize("vid", sorted(VECTORS))
def test_golden_vector_from_first_principles(vid: str) -> None:
    """Recompute a vector with blake3 and hand-written bytes only, exactly as FORMAT.md states it."""
    v = VECTORS[vid]
    spec, ct, tokens = v["spec"], v["chunk_tokens"], v["tokens"]
    identity = [spec.name, spec.version, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype_name]
    assert _canonical_msgpack(identity).hex() == v["identity_msgpack"]
    assert _canonical_msgpack([3, *identity, ct]).hex() == v["key_root_msgpack"]
    assert blake3.blake3(MODEL_ID_DOMAIN + bytes.fromhex(v["identity_msgpack"])).digest()[:16].hex() == v["model_id"]
    parent = blake3.blake3(KEY_DOMAIN + bytes.fromhex(v["key_root_msgpack"])).digest()
    assert parent.hex() == v["key_root"]
    for start, end, key in v["chunks"]:
        preimage = parent + (end - start).to_bytes(4, "little")
        preimage += b"".join(t.to_bytes(4, "little") for t in tokens[start:end])
        assert len(preimage) == 32 + 4 + 4 * (end - start)
        parent = blake3.blake3(preimage).digest()
        assert parent.hex() == key


def test_documented_chunk0_preimage() -> None:
    v = VECTORS["keys-2"]
    preimage = bytes.fromhex(
        "7a3ad037afa2cdc16456f514d4c31f0483cdb3828f05bd64274f1d05abac07d2040000000000000001000000ff00000000010000"
    )
    assert blake3.blake3(preimage).hexdigest() == v["chunks"][0][2]


# ---------------------------------------------------------------------- canonical msgpack


def _canonical_msgpack(value: object) -> bytes:
    """A minimal canonical msgpack encoder for the types the key chain hashes (FORMAT.md section 1)."""
    if isinstance(value, bool) or value is None:
        raise TypeError(value)
    if isinstance(value, int):
        assert value >= 0
        if value < 0x80:
            return bytes([value])
        for tag, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
            if value < 1 << (8 * width):
                return bytes([tag]) + value.to_bytes(width, "big")
        raise OverflowError(value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        n = len(raw)
        if n < 32:
            return bytes([0xA0 | n]) + raw
        for tag, width in ((0xD9, 1), (0xDA, 2), (0xDB, 4)):
            if n < 1 << (8 * width):
                return bytes([tag]) + n.to_bytes(width, "big") + raw
    if isinstance(value, list):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        return head + b"".join(_canonical_msgpack(v) for v in value)
    raise TypeError(value)


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=300).filter(lambda s: len(s.encode("utf-8")) <= 1024)
specs = st.builds(
    ModelSpec,
    name=names,
    version=names,
    num_layers=st.integers(1, MAX_LAYERS),
    num_kv_heads=st.integers(1, 2**31 - 1),
    head_dim=st.integers(1, 2**31 - 1),
    dtype=st.sampled_from(list(DTYPES.values())),
)


@SETTINGS
@given(spec=specs, chunk_tokens=st.integers(1, 2**24))
def test_key_root_and_model_id_use_canonical_msgpack(spec: ModelSpec, chunk_tokens: int) -> None:
    identity = [spec.name, spec.version, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype_name]
    root_payload = _canonical_msgpack([FORMAT_VERSION, *identity, chunk_tokens])
    assert msgpack.packb([FORMAT_VERSION, *identity, chunk_tokens], use_bin_type=True) == root_payload
    assert key_root(spec, chunk_tokens) == blake3.blake3(KEY_DOMAIN + root_payload).digest()
    assert model_id(spec) == blake3.blake3(MODEL_ID_DOMAIN + _canonical_msgpack(identity)).digest()[:16]


def test_dtype_names_are_the_documented_ones() -> None:
    assert supported_dtype_names() == tuple(DTYPES)
    for name, dtype in DTYPES.items():
        assert ModelSpec("m", "v", 1, 1, 1, dtype).dtype_name == name


# ---------------------------------------------------------------------- stability across processes

_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from kvstore import ModelSpec
    from kvstore.formats.keys import chunk_keys, key_root, model_id, normalize_tokens
    out = []
    for name, version, dtype, ct, tokens in json.loads(sys.argv[1]):
        spec = ModelSpec(name, version, 3, 2, 8, getattr(torch, dtype))
        keys = chunk_keys(spec, normalize_tokens(tokens), ct)
        out.append([model_id(spec).hex(), key_root(spec, ct).hex(), [k.hex for k in keys]])
    print(json.dumps(out))
    """
)


def test_keys_are_stable_across_processes_and_hash_seeds() -> None:
    cases = [
        ["m", "v1", "bfloat16", 16, list(range(50))],
        ["模型-ü", "β", "float8_e5m2", 4, [2**32 - 1, 0, 5, 7, 11]],
        ["x" * 40, "2024", "float32", 3, [9] * 10],
    ]
    here = []
    for name, version, dtype, ct, tokens in cases:
        spec = ModelSpec(name, version, 3, 2, 8, DTYPES[dtype])
        here.append([model_id(spec).hex(), key_root(spec, ct).hex(), _keys_hex(spec, tokens, ct)])
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(cases)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        assert json.loads(proc.stdout) == here, f"keys differ with PYTHONHASHSEED={seed}"


# ---------------------------------------------------------------------- token inputs


def test_every_token_input_form_gives_the_same_keys() -> None:
    spec = VECTORS["keys-2"]["spec"]
    tokens = VECTORS["keys-2"]["tokens"]
    want = [c[2] for c in VECTORS["keys-2"]["chunks"]]
    forms: list[object] = [
        tokens,
        tuple(tokens),
        np.array(tokens, dtype=np.uint32),
        np.array(tokens, dtype=np.int64),
        np.array(tokens, dtype=np.uint64),
        np.array(tokens, dtype=">i8"),  # big-endian input must still hash as little-endian
        np.array([*tokens, 0], dtype=np.int64)[:-1],
        np.array([t for pair in zip(tokens, tokens, strict=True) for t in pair], dtype=np.int64)[::2],  # strided
        torch.tensor(tokens, dtype=torch.int64),
        [np.int64(t) for t in tokens],
    ]
    for form in forms:
        assert _keys_hex(spec, form, 4) == want, type(form)
    small = [t for t in tokens if t < 2**31]
    spec_small = ModelSpec("s", "v", 1, 1, 1, torch.float16)
    want_small = _keys_hex(spec_small, small, 3)
    assert _keys_hex(spec_small, torch.tensor(small, dtype=torch.int32), 3) == want_small
    assert _keys_hex(spec_small, np.array(small, dtype=np.int32), 3) == want_small


@pytest.mark.parametrize(
    "tokens",
    [
        [-1],
        [2**32],
        [2**64],
        [1.0, 2.0],
        [True, False],
        ["1"],
        [[1, 2]],
        "123",
        b"123",
        np.array([1.5]),
        np.array([True]),
        np.array([[1, 2]]),
        np.array([2**32], dtype=np.uint64),
        np.array([-5], dtype=np.int8),
        torch.tensor([1.0]),
        torch.tensor([[1, 2]]),
        torch.tensor([-1]),
        torch.tensor([2**32]),
        torch.tensor([True]),
        42,
        None,
    ],
    ids=repr,
)
def test_bad_tokens_are_invalid_input(tokens: object) -> None:
    with pytest.raises(InvalidInputError):
        normalize_tokens(tokens)  # type: ignore[arg-type]


def test_token_bounds_are_inclusive() -> None:
    arr = normalize_tokens([0, 2**32 - 1])
    assert arr.dtype == np.dtype("<u4")
    assert arr.tolist() == [0, 2**32 - 1]
    assert normalize_tokens([]).size == 0


# ---------------------------------------------------------------------- properties of the chain

small_specs = st.builds(
    ModelSpec,
    name=st.sampled_from(["a", "b", "ab", "模型"]),
    version=st.sampled_from(["v1", "v2", "1"]),
    num_layers=st.integers(1, 4),
    num_kv_heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 64, 128]),
    dtype=st.sampled_from(list(DTYPES.values())),
)
token_lists = st.lists(st.integers(0, 2**32 - 1), max_size=120)


@SETTINGS
@given(spec=small_specs, ct=st.integers(1, 16), prefix=token_lists, a=token_lists, b=token_lists)
def test_equal_prefixes_give_equal_keys_for_shared_full_chunks(
    spec: ModelSpec, ct: int, prefix: list[int], a: list[int], b: list[int]
) -> None:
    ka = chunk_keys(spec, normalize_tokens(prefix + a), ct)
    kb = chunk_keys(spec, normalize_tokens(prefix + b), ct)
    shared_full = len(prefix) // ct
    for i in range(shared_full):
        assert ka[i].digest == kb[i].digest
        assert (ka[i].start, ka[i].end) == (i * ct, (i + 1) * ct)
    # Beyond the shared prefix, keys match exactly when ranges and all tokens up to them match.
    ta, tb = prefix + a, prefix + b
    for x, y in zip(ka, kb, strict=False):
        same = (x.start, x.end) == (y.start, y.end) and ta[: x.end] == tb[: y.end]
        assert (x.digest == y.digest) == same


@SETTINGS
@given(
    spec=small_specs,
    ct=st.integers(1, 16),
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=120),
    data=st.data(),
)
def test_a_single_token_change_changes_exactly_the_keys_from_its_chunk_on(
    spec: ModelSpec, ct: int, tokens: list[int], data: st.DataObject
) -> None:
    p = data.draw(st.integers(0, len(tokens) - 1), label="position")
    new = data.draw(st.integers(0, 2**32 - 1).filter(lambda t: t != tokens[p]), label="new token")
    changed = [*tokens[:p], new, *tokens[p + 1 :]]
    before = chunk_keys(spec, normalize_tokens(tokens), ct)
    after = chunk_keys(spec, normalize_tokens(changed), ct)
    assert [(k.start, k.end) for k in before] == [(k.start, k.end) for k in after]
    first = p // ct
    for i, (x, y) in enumerate(zip(before, after, strict=True)):
        if i < first:
            assert x.digest == y.digest, f"chunk {i} before the change at {p} changed"
        else:
            assert x.digest != y.digest, f"chunk {i} at/after the change at {p} kept its key"


def _other_value(spec: ModelSpec, field: str, data: st.DataObject) -> ModelSpec:
    current = getattr(spec, field)
    if field in ("name", "version"):
        value = data.draw(names.filter(lambda s: s != current), label=field)
    elif field == "dtype":
        value = data.draw(st.sampled_from([d for d in DTYPES.values() if d != current]), label=field)
    else:
        limit = MAX_LAYERS if field == "num_layers" else MAX_DIM
        value = data.draw(st.integers(1, limit).filter(lambda n: n != current), label=field)
    fields = {f: getattr(spec, f) for f in ("name", "version", "num_layers", "num_kv_heads", "head_dim", "dtype")}
    return ModelSpec(**{**fields, field: value})


@SETTINGS
@given(
    spec=small_specs,
    ct=st.integers(1, 16),
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=80),
    field=st.sampled_from(["name", "version", "num_layers", "num_kv_heads", "head_dim", "dtype", "chunk_tokens"]),
    data=st.data(),
)
def test_a_different_spec_field_or_chunk_size_gives_disjoint_keys(
    spec: ModelSpec, ct: int, tokens: list[int], field: str, data: st.DataObject
) -> None:
    arr = normalize_tokens(tokens)
    if field == "chunk_tokens":
        other_spec, other_ct = spec, data.draw(st.integers(1, 16).filter(lambda n: n != ct), label="ct")
    else:
        other_spec, other_ct = _other_value(spec, field, data), ct
    mine = {k.digest for k in chunk_keys(spec, arr, ct)} | {key_root(spec, ct)}
    theirs = {k.digest for k in chunk_keys(other_spec, arr, other_ct)} | {key_root(other_spec, other_ct)}
    assert mine.isdisjoint(theirs)
    if field == "chunk_tokens":
        assert model_id(spec) == model_id(other_spec)  # the model id does not depend on the chunk size
    else:
        assert model_id(spec) != model_id(other_spec)


@SETTINGS
@given(a=names, b=names, c=names, d=names)
def test_identity_strings_are_unambiguous(a: str, b: str, c: str, d: str) -> None:
    """Concatenation-style collisions ("ab"+"c" vs "a"+"bc") cannot happen: msgpack frames each string."""
    assume((a, b) != (c, d))
    s1 = ModelSpec(a, b, 1, 1, 1, torch.float16)
    s2 = ModelSpec(c, d, 1, 1, 1, torch.float16)
    assert model_id(s1) != model_id(s2)
    assert key_root(s1, 4) != key_root(s2, 4)


def test_concatenation_neighbours_differ() -> None:
    assert model_id(ModelSpec("ab", "c", 1, 1, 1, torch.float16)) != model_id(
        ModelSpec("a", "bc", 1, 1, 1, torch.float16)
    )


@SETTINGS
@given(spec=small_specs, ct=st.integers(2, 16), tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=80))
def test_tail_chunks(spec: ModelSpec, ct: int, tokens: list[int]) -> None:
    arr = normalize_tokens(tokens)
    with_tail = chunk_keys(spec, arr, ct)
    without = chunk_keys(spec, arr, ct, include_tail=False)
    n = len(tokens)
    assert len(without) == n // ct
    assert len(with_tail) == n // ct + (1 if n % ct else 0)
    assert [k.digest for k in with_tail[: len(without)]] == [k.digest for k in without]
    assert [(k.start, k.end) for k in with_tail] == [(s, min(s + ct, n)) for s in range(0, n, ct)]
    if n % ct:
        tail = with_tail[-1]
        assert tail.num_tokens == n % ct
        # The tail's key commits to its length: extending the prompt gives another key at this index.
        longer = chunk_keys(spec, normalize_tokens([*tokens, 1]), ct)
        assert longer[tail.index].digest != tail.digest
        # next_key recomputes it from its parent alone (what a tail-marker lookup does).
        again = next_key(tail.parent, tail.index, arr, tail.start, tail.end)
        assert again == tail


def test_empty_prompt_has_no_keys() -> None:
    spec = VECTORS["keys-1"]["spec"]
    assert chunk_keys(spec, normalize_tokens([]), 16) == []


def test_keys_of_a_128k_token_prompt() -> None:
    """512 chunks of 256 tokens: all distinct, contiguous and chained (no timing asserted)."""
    spec = ModelSpec("llama", "v1", 32, 8, 128, torch.bfloat16)
    tokens = np.random.default_rng(0).integers(0, 128_000, size=128 * 1024, dtype=np.int64)
    keys = chunk_keys(spec, normalize_tokens(tokens), 256)
    assert len(keys) == 512
    assert len({k.digest for k in keys}) == 512
    assert keys[0].start == 0
    assert keys[-1].end == 128 * 1024
    assert all(a.end == b.start for a, b in itertools.pairwise(keys))
    assert all(b.parent == a.digest for a, b in itertools.pairwise(keys))
    assert chunk_keys(spec, normalize_tokens(tokens[: 256 * 100]), 256) == keys[:100]
