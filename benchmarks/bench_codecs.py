"""Compression ratio and per-core encode/decode speed of kvstore's codecs on real transformer KV.

    python benchmarks/bench_codecs.py                       # 8 layers, 4096 tokens, bf16 and fp16
    python benchmarks/bench_codecs.py --quick               # 4 layers, 1024 tokens
    python benchmarks/bench_codecs.py --store-json store.json   # project onto bench_store.py's throughput

The KV comes from a forward pass (``use_cache=True``) of a random-weight
``LlamaForCausalLM`` built from a ``LlamaConfig`` (nothing is downloaded), so it
is what a transformer produces (RMSNorm'd projections, post-RoPE keys), but with
untrained weights: trained models have outlier channels and structured values,
so treat the ratios as indicative. Needs ``transformers`` (the ``hf`` extra).

Each codec encodes one chunk-layer object at a time (``--chunk-tokens`` tokens,
K then V, the unit kvstore stores) on one thread; GB/s are of decoded bytes
(1 GB = 1e9 B), median of ``--reps`` passes over every object. kvstore's codecs
go through ``kvstore.formats.codecs.get_codec(name)``; the blosc variants call
numcodecs directly to inform the choice of shuffle, compressor and level.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.formats.codecs import get_codec

GB = 1e9
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- real KV


def model_kv(args: argparse.Namespace, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) as [tokens, kv_heads, head_dim] from a forward pass of a random-weight Llama."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("bench_codecs needs transformers: pip install 'kvstore[hf]'") from None
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // args.head_dim,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(8192, args.tokens),
        rope_theta=500000.0,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # skip the vocab projection of every token
    cache = getattr(out, "cache", None) or out.past_key_values
    kv = []
    for i in range(args.layers):
        if hasattr(cache, "layers"):  # transformers >= 5
            k, v = cache.layers[i].keys, cache.layers[i].values
        else:
            k, v = cache.key_cache[i], cache.value_cache[i]
        # [batch, heads, seq, dim] -> [seq, heads, dim]
        kv.append((k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()))
    return kv


def layer_objects(kv: list[tuple[torch.Tensor, torch.Tensor]], chunk_tokens: int) -> list[list[memoryview]]:
    """The decoded parts (K bytes, V bytes) of every chunk-layer object."""
    tokens = kv[0][0].shape[0]
    out = []
    for start in range(0, tokens - chunk_tokens + 1, chunk_tokens):
        for k, v in kv:
            out.append(
                [
                    k[start : start + chunk_tokens].contiguous().view(-1).view(torch.uint8).numpy().data,
                    v[start : start + chunk_tokens].contiguous().view(-1).view(torch.uint8).numpy().data,
                ]
            )
    return out


# ---------------------------------------------------------------------- codecs


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    encode: Callable[[list[memoryview]], bytes]
    decode: Callable[[bytes, int], Any]
    kvstore_codec: bool


def kvstore_variant(name: str, itemsize: int) -> Variant:
    codec = get_codec(name)
    return Variant(name, lambda parts: codec.encode(parts, itemsize), codec.decode, True)


def blosc_variant(cname: str, shuffle: str, clevel: int, itemsize: int) -> Variant:
    from numcodecs import blosc

    mode = {"noshuffle": blosc.NOSHUFFLE, "byteshuffle": blosc.SHUFFLE, "bitshuffle": blosc.BITSHUFFLE}[shuffle]

    def encode(parts: list[memoryview]) -> bytes:
        raw = np.frombuffer(b"".join(parts), dtype=f"u{itemsize}")
        return bytes(blosc.compress(raw, cname.encode(), clevel, mode, 0))

    def decode(data: bytes, nbytes: int) -> Any:
        out = bytearray(nbytes)
        blosc.decompress(data, out)
        return out

    return Variant(f"blosc {cname} {shuffle} c{clevel}", encode, decode, False)


def variants(itemsize: int, extra: bool) -> list[Variant]:
    out = [kvstore_variant(n, itemsize) for n in ("none", "lz4", "blosc-lz4")]
    if extra:
        for cname, shuffle, clevel in [
            ("lz4", "noshuffle", 5),
            ("lz4", "byteshuffle", 1),
            ("lz4", "byteshuffle", 5),
            ("lz4", "byteshuffle", 9),
            ("lz4", "bitshuffle", 1),
            ("lz4", "bitshuffle", 9),
            ("zstd", "byteshuffle", 1),
            ("zstd", "bitshuffle", 1),
            ("zstd", "bitshuffle", 3),
        ]:
            out.append(blosc_variant(cname, shuffle, clevel, itemsize))
    return out


@dataclass(frozen=True, slots=True)
class Row:
    dtype: str
    codec: str
    kvstore_codec: bool
    ratio: float
    encode_gbps: float
    decode_gbps: float


def measure(dtype: str, v: Variant, objects: list[list[memoryview]], reps: int) -> Row:
    raw = sum(len(p) for parts in objects for p in parts)
    encoded = [v.encode(parts) for parts in objects]  # warm-up and the data to decode
    for parts, data in zip(objects, encoded, strict=True):
        decoded = bytes(v.decode(data, sum(len(p) for p in parts)))
        if decoded != b"".join(parts):
            raise SystemExit(f"{v.name}: the round trip changed the bytes")
    enc, dec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for parts in objects:
            v.encode(parts)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for parts, data in zip(objects, encoded, strict=True):
            v.decode(data, len(parts[0]) + len(parts[1]))
        dec.append(time.perf_counter() - t0)
    stored = sum(len(d) for d in encoded)
    return Row(
        dtype,
        v.name,
        v.kvstore_codec,
        raw / stored,
        raw / statistics.median(enc) / GB,
        raw / statistics.median(dec) / GB,
    )


# ---------------------------------------------------------------------- projection


def store_rates(path: str | None, overrides: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per scenario and operation, (kvstore GB/s with codec none, raw floor GB/s).

    From bench_store.py's JSON, and from NAME=SAVE/LOAD items (an I/O-bound store,
    e.g. a network link: kvstore at the floor).
    """
    rates: dict[str, dict[str, tuple[float, float]]] = {}
    if path:
        with open(path) as f:
            doc = json.load(f)
        if doc["config"]["codec"] != "none":
            raise SystemExit(f"{path} was measured with codec {doc['config']['codec']}, not none")
        for backend, res in doc["results"].items():

            def pair(name: str, res: dict[str, Any] = res) -> tuple[float, float]:
                return res[name]["kvstore"]["median_gbps"], res[name]["floor"]["median_gbps"]

            rates[f"{backend} warm"] = {"save": pair("save"), "load": pair("load warm")}
            if "load cold" in res:
                rates[f"{backend} cold"] = {"save": pair("save"), "load": pair("load cold")}
    for item in overrides:
        name, _, value = item.partition("=")
        save, _, load = value.partition("/")
        rates[name] = {"save": (float(save), float(save)), "load": (float(load or save), float(load or save))}
    return rates


def projected(row: Row, rates: tuple[float, float], op: str, cores: int) -> float:
    """Estimated logical GB/s of kvstore with this codec, from its GB/s with codec none.

    Per logical byte: kvstore's time with ``none``, minus the I/O time the
    compression saves (1 - 1/ratio of the floor's time), plus the codec's time
    spread over ``cores`` threads, without overlap (the 2-core case, where
    kvstore is mostly CPU-bound).
    """
    if row.codec == "none":
        return rates[0]
    kv, floor = rates
    codec = row.encode_gbps if op == "save" else row.decode_gbps
    return 1 / (1 / kv - (1 - 1 / row.ratio) / floor + 1 / (codec * cores))


# ---------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-extra", dest="extra", action="store_false", help="only kvstore's codecs, no blosc variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores assumed by the projection")
    p.add_argument("--store-json", default=None, help="bench_store.py --json output, for the projection")
    p.add_argument(
        "--store-rate", action="append", default=[], metavar="NAME=SAVE/LOAD", help="raw store GB/s to project onto"
    )
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--quick", action="store_true", help="4 layers, 1024 tokens, 2 reps")
    args = p.parse_args()
    if args.quick:
        args.layers, args.tokens, args.reps = 4, 1024, 2
    return args


def main() -> None:
    args = parse_args()
    from numcodecs import blosc

    blosc.use_threads = False  # one thread per call, as in kvstore's worker threads
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()
    rows: list[Row] = []
    stats: dict[str, dict[str, float]] = {}
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        t0 = time.perf_counter()
        kv = model_kv(args, dtype)
        log(f"{dtype_name}: forward pass over {args.tokens} tokens in {time.perf_counter() - t0:.1f} s")
        k_all = torch.stack([k for k, _ in kv]).float()
        v_all = torch.stack([v for _, v in kv]).float()
        stats[dtype_name] = {
            "k_std": float(k_all.std()),
            "k_absmax": float(k_all.abs().max()),
            "v_std": float(v_all.std()),
            "v_absmax": float(v_all.abs().max()),
        }
        objects = layer_objects(kv, args.chunk_tokens)
        itemsize = kv[0][0].element_size()
        for v in variants(itemsize, args.extra):
            rows.append(measure(dtype_name, v, objects, args.reps))
            log(f"{dtype_name} {v.name}: ratio {rows[-1].ratio:.3f}")
    report(args, rows, stats)
    print(f"load average during the run: {os.getloadavg()[0]:.2f} (1 min); other processes skew per-core figures")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in vars(args).items() if k != "json_path"},
                    "kv_stats": stats,
                    "rows": [_row_dict(r) for r in rows],
                },
                f,
                indent=2,
            )
        print(f"\nwrote {args.json_path}")
    print(f"(bench_codecs took {time.perf_counter() - t_start:.0f} s)")


def _row_dict(r: Row) -> dict[str, Any]:
    return {name: getattr(r, name) for name in Row.__slots__}


def report(args: argparse.Namespace, rows: list[Row], stats: dict[str, dict[str, float]]) -> None:
    obj = args.chunk_tokens * args.kv_heads * args.head_dim * 2
    print(
        f"\nrandom-weight Llama: {args.layers} layers, hidden {args.hidden},"
        f" {args.kv_heads} KV heads x {args.head_dim}, {args.tokens} tokens;"
        f" objects of {args.chunk_tokens} tokens (K then V) = {2 * obj / 2**20:.2f} MiB in bf16/fp16;"
        f" one thread; GB/s of decoded bytes, median of {args.reps}"
    )
    for dtype, s in stats.items():
        k, v = f"K std {s['k_std']:.3f} |max| {s['k_absmax']:.2f}", f"V std {s['v_std']:.3f} |max| {s['v_absmax']:.2f}"
        print(f"  {dtype}: {k}; {v}")
    head = f"{'dtype':9} {'codec':28} {'ratio':>6} {'enc GB/s/core':>14} {'dec GB/s/core':>14}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mark = "" if r.kvstore_codec else "  (variant)"
        dec = f"{r.decode_gbps:14.2f}" if r.codec != "none" else f"{'(no-op view)':>14}"
        print(f"{r.dtype:9} {r.codec:28} {r.ratio:6.3f} {r.encode_gbps:14.2f} {dec}{mark}")
    rates = store_rates(args.store_json, args.store_rate)
    if not rates:
        return
    print(
        f"\nestimated kvstore GB/s per codec on {args.cores} cores: 1 / (1/kvstore_none - (1 - 1/ratio)/floor"
        " + 1/(codec GB/s/core x cores))"
    )
    names = list(rates)
    print(f"{'dtype':9} {'codec':28} " + " ".join(f"{n + ' ' + op:>18}" for n in names for op in ("save", "load")))
    for r in rows:
        if not r.kvstore_codec and "c1" not in r.codec:
            continue
        cells = " ".join(
            f"{projected(r, rates[n][op], op, args.cores):18.2f}" for n in names for op in ("save", "load")
        )
        print(f"{r.dtype:9} {r.codec:28} {cells}")


if __name__ == "__main__":
    main()
