"""Time-to-first-token of a transformers model: full prefill vs a kvstore cache hit.

    python benchmarks/bench_ttft.py                      # 1K to 16K tokens; memory, local, s3 (moto)
    python benchmarks/bench_ttft.py --server rgw         # s3 on Ceph RGW instead of moto
    python benchmarks/bench_ttft.py --quick              # a small model and short prompts: checks it works
    python benchmarks/bench_ttft.py --preset small-317m --lengths 8192 --backends local --out ttft-out

The model has random weights (nothing is downloaded). The default shape is Llama
3.2 1B's, a small production model: 16 layers, hidden 2048, 32 query and 8 KV
heads of dim 64, bf16, 32 KiB of KV per token, 1.24B parameters. ``--preset
small-317m`` keeps the KV per token and cuts the compute per token to a third,
which shows how the saving shrinks with the model (the one-token step and the KV
bytes stay, the prefill avoided gets cheaper).

For each context length one prompt is prefilled in full (the "no cache" TTFT,
which also yields the KV), saved to each store, then served from it: lookup + load of
all but the last token + a one-token forward (``kvstore.hf.prefill``). s3:// runs
against a server on 127.0.0.1 (port 0): moto, or Ceph's RADOS Gateway with
``--server rgw``, named in the tables' column ("s3 (moto)"); it measures the
protocol, the library and the server, not a network.

The hit's next-token logits are compared with the full prefill's and with the last
token computed alone over the in-memory KV ("diff vs split": 0 when the store returns
the KV bit-exactly; in bf16 a full prefill rounds the last position differently from
a one-token step, so the first difference need not be 0).

A second sweep of short prompts (``--short-lengths``) finds the break-even length
per backend: below it, recomputing is faster than a store round trip. That is the
figure behind ``kvstore.hf.MIN_CACHED_TOKENS``. Figures are medians of ``--reps``
(``--prefill-reps`` for full prefills). Writes ``ttft.md``, ``ttft.csv`` and
``ttft.png`` (log scale) under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import os
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from _s3servers import S3Server, add_server_option, fresh_store, s3_server

import kvstore
import kvstore.hf
from kvstore.formats.hf import cache_from_kv, kv_from_cache

PRESETS: dict[str, dict[str, int]] = {
    # The shape of Llama 3.2 1B (a small production model): 16 layers, hidden 2048, GQA 32/8 heads of 64,
    # 32 KiB of bf16 KV per token; 1.24B parameters with its 128K-token vocabulary.
    "llama-3.2-1b": dict(
        layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, tied=1
    ),
    # A smaller model with the same KV per token: a third of the compute per token, so a hit saves less.
    "small-317m": dict(
        layers=16, hidden=1024, intermediate=4096, heads=8, kv_heads=4, head_dim=128, vocab=32000, tied=0
    ),
    "tiny": dict(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, vocab=1000, tied=0),
}


def build_model(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        tie_word_embeddings=bool(args.tied),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(args.lengths) + 16,
        attn_implementation="sdpa",
        dtype=args.dtype,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    return model


def _split_logits(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], prompt: torch.Tensor) -> torch.Tensor:
    """Logits of the last token over the in-memory KV of the others: what an exact store must reproduce.

    A full prefill computes the last position inside one large matrix product; a hit
    computes it alone. In bf16 the two kernels round differently, so the exactness
    of the store is judged against this split computation, which should match bitwise.
    """
    n = len(prompt)
    cache = cache_from_kv([(k[: n - 1], v[: n - 1]) for k, v in kv], config=model.config)
    with torch.inference_mode():
        out = model(input_ids=prompt[None, n - 1 :], cache=cache, use_cache=True, logits_to_keep=1)
    logits: torch.Tensor = out.logits[0, -1].float()
    return logits


async def measure(
    model: Any,
    spec: kvstore.ModelSpec,
    stores: dict[str, kvstore.KVStore],
    n: int,
    reps: int,
    seed: int,
    prefill_reps: int = 1,
) -> dict[str, Any]:
    """Median TTFT (s) per mode for one prompt of ``n`` tokens, and the largest logit differences."""
    prompt = torch.randint(3, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))
    times: dict[str, list[float]] = {m: [] for m in ("no cache", *stores)}
    ref = None
    for _ in range(prefill_reps):
        ref = await kvstore.hf.prefill(None, spec, model, prompt)
        times["no cache"].append(ref.ttft_s)
    assert ref is not None
    kv = kv_from_cache(ref.cache, num_tokens=n)
    split = await asyncio.to_thread(_split_logits, model, kv, prompt)
    diff = split_diff = 0.0
    for name, store in stores.items():
        await store.save_prefix(spec, prompt, kv)
        for _ in range(reps):
            hit = await kvstore.hf.prefill(store, spec, model, prompt, min_cached_tokens=0)
            if hit.cached_tokens != n - 1:
                raise SystemExit(f"{name}: expected a hit of {n - 1} tokens, got {hit.cached_tokens}")
            times[name].append(hit.ttft_s)
            diff = max(diff, (hit.logits.float() - ref.logits.float()).abs().max().item())
            split_diff = max(split_diff, (hit.logits.float() - split).abs().max().item())
    row: dict[str, Any] = {
        "tokens": n,
        "kv_mib": n * spec.bytes_per_token / 2**20,
        "max_logit_diff": diff,
        "split_diff": split_diff,
    }
    row.update({m: statistics.median(t) for m, t in times.items() if t})
    return row


def break_even(rows: list[dict[str, Any]], mode: str) -> str:
    """The context length where a cache hit becomes faster than recomputing (log-linear interpolation)."""
    pts = sorted((r["tokens"], r["no cache"] / r[mode]) for r in rows if mode in r)
    if not pts:
        return "not measured"
    if pts[0][1] >= 1:
        return f"<= {pts[0][0]} tokens (faster at every length measured)"
    for (n0, s0), (n1, s1) in itertools.pairwise(pts):
        if s0 < 1 <= s1:
            return f"~{n0 * (n1 / n0) ** ((1 - s0) / (s1 - s0)):.0f} tokens"
    return f"> {pts[-1][0]} tokens (not reached)"


def write_outputs(out: Path, rows: list[dict[str, Any]], modes: list[str], title: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    header = [
        "tokens",
        "KV MiB",
        *[f"{m} ms" for m in modes],
        *[f"{m} speed-up" for m in modes[1:]],
        "max abs logit diff",
        "diff vs split",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with (out / "ttft.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            cells = [
                str(r["tokens"]),
                f"{r['kv_mib']:.3g}",
                *[f"{r[m] * 1e3:.1f}" for m in modes],
                *[f"{r['no cache'] / r[m]:.1f}x" for m in modes[1:]],
                f"{r['max_logit_diff']:.3g}",
                f"{r['split_diff']:.3g}",
            ]
            w.writerow(cells)
            lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "ttft.md").write_text(f"{title.replace(chr(10), ' ')}\n\n{table}\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in modes:
        ax.plot([r["tokens"] for r in rows], [r[m] * 1e3 for r in rows], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("\n".join(textwrap.wrap(" ".join(title.split()), 90)), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ttft.png", dpi=120)
    return table


async def run(args: argparse.Namespace) -> None:
    model = build_model(args)
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="bench-llama", version="random-seed-0")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    title = (
        f"TTFT, {params:.0f}M-param Llama ({args.layers} layers, hidden {args.hidden}, {args.heads} query and "
        f"{args.kv_heads} KV heads x "
        f"{args.head_dim}, {args.dtype}, {spec.bytes_per_token // 1024} KiB KV/token),\n"
        f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(title, flush=True)
    await kvstore.hf.prefill(None, spec, model, list(range(3, 67)))  # warm-up
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, _maybe_s3("s3" in args.backends, args.server) as s3:
        opened: dict[str, kvstore.KVStore] = {}
        for name in args.backends:
            if name == "memory":
                opened[name] = await kvstore.open(f"memory://ttft-{uuid.uuid4().hex}")
            elif name == "local":
                opened[name] = await kvstore.open(Path(tmp) / "store")
            elif name == "s3" and s3 is not None:
                url, options = fresh_store(s3, "ttft")
                opened[f"s3 ({s3.name})"] = await kvstore.open(url, storage_options=options)
        try:
            modes = ["no cache", *opened]
            rows = []
            for i, n in enumerate(args.lengths):
                rows.append(await measure(model, spec, opened, n, args.reps, seed=i, prefill_reps=args.prefill_reps))
                r = rows[-1]
                print(
                    f"{n:6d} tokens: "
                    + ", ".join(f"{m} {r[m] * 1e3:.0f} ms" for m in modes)
                    + f"; max |dlogit| {r['max_logit_diff']:.3g} vs full prefill,"
                    + f" {r['split_diff']:.3g} vs the same split computed from memory",
                    flush=True,
                )
            short = []
            for i, n in enumerate(args.short_lengths):
                short.append(await measure(model, spec, opened, n, args.reps, seed=1000 + i, prefill_reps=args.reps))
                r = short[-1]
                print(f"{n:6d} tokens: " + ", ".join(f"{m} {r[m] * 1e3:.1f} ms" for m in modes), flush=True)
        finally:
            for store in opened.values():
                await store.close()

    table = write_outputs(Path(args.out), sorted(short + rows, key=lambda r: int(r["tokens"])), modes, title)
    print(f"\n{table}\n")
    for m in modes[1:]:
        ratios = ", ".join(f"{r['tokens']}: {r['no cache'] / r[m]:.1f}x" for r in rows)
        print(f"speed-up {m:6s} {ratios}; break-even {break_even(short + rows, m)}")
    print(f"\nwrote {args.out}/ttft.md, ttft.csv, ttft.png")


@contextmanager
def _maybe_s3(wanted: bool, name: str) -> Iterator[S3Server | None]:
    if not wanted:
        yield None
        return
    if name == "moto":
        try:
            import moto.server  # noqa: F401
        except ImportError:
            print("moto is not installed: skipping s3 (pip install 'kvstore[bench]')", file=sys.stderr)
            yield None
            return
    with s3_server(name) as server:
        yield server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--lengths", type=ints, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--short-lengths", type=ints, default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--backends", type=lambda s: s.split(","), default=["memory", "local", "s3"])
    add_server_option(p)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="llama-3.2-1b",
        help="model shape; --layers, --hidden, ... override single values",
    )
    for name in ("layers", "hidden", "intermediate", "heads", "kv-heads", "head-dim", "vocab", "tied"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=3, help="repetitions of each cache hit (median)")
    p.add_argument("--prefill-reps", type=int, default=1, help="repetitions of each full prefill (slow)")
    p.add_argument("--dir", default=None, help="parent of the local store (default: a temp dir)")
    p.add_argument("--out", default="bench-ttft", help="directory for ttft.md, ttft.csv, ttft.png")
    p.add_argument("--quick", action="store_true", help="tiny model and lengths: checks that it works")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.lengths, args.short_lengths = "tiny", [128, 256, 512], [8, 32]
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


if __name__ == "__main__":
    t0 = time.perf_counter()
    asyncio.run(run(parse_args()))
    print(f"total {time.perf_counter() - t0:.0f} s")
