"""Time to first token through vLLM (CPU): recompute, vLLM's own prefix cache, ExampleConnector, kvstore.

    make bench-vllm                                      # = .venv-vllm/bin/python benchmarks/bench_vllm.py
    .venv-vllm/bin/python benchmarks/bench_vllm.py --quick            # a tiny model: checks that it works
    .venv-vllm/bin/python benchmarks/bench_vllm.py --preset small-317m --lengths 1024 8192

Runs in the vLLM environment (``make vllm-venv``). A random-weight Llama (default: the
Llama 3.2 1B shape of bench_ttft.py) is written to a temporary directory and served by
in-process engines with prefix caching on (the production setting). A prompt of
``L + 2`` tokens lets every method reuse exactly ``L`` tokens (whole blocks of 128)
and compute the last 2; TTFT is one ``generate`` with ``max_tokens=1``:

- recompute: an engine without connector prefills the prompt;
- prefix cache: the same engine again: vLLM's own cache, KV already in place (the physical best case);
- ExampleConnector: vLLM's reference connector, safetensors per layer in a local directory;
- kvstore local / kvstore s3: ``KVStoreConnector`` on a local directory and on a moto S3 server (127.0.0.1).

One engine saves every prompt through all three connectors at once (vLLM's
MultiConnector), then one fresh engine per connector loads them: before each
measurement its own prefix cache is reset, so each repetition loads from the store.
Hits are medians of ``--reps``; the prompts' outputs are checked to be equal across
methods. Writes ``vllm_ttft.md``, ``vllm_ttft.csv`` and ``vllm_ttft.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_ttft import PRESETS  # the same model shapes as bench_ttft

METHODS = ("recompute", "prefix cache", "ExampleConnector", "kvstore local", "kvstore s3")
BLOCK = 128


def build_model(path: Path, preset: dict[str, int], max_len: int) -> int:
    """Write a random-weight Llama of ``preset``'s shape; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=preset["vocab"],
        tie_word_embeddings=bool(preset["tied"]),
        hidden_size=preset["hidden"],
        intermediate_size=preset["intermediate"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        num_key_value_heads=preset["kv_heads"],
        head_dim=preset["head_dim"],
        max_position_embeddings=max_len,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return params


@contextmanager
def moto_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """A moto S3 server on 127.0.0.1 in a child process (vLLM's engine start trips over flask's proxies in-process)."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(200):
            try:
                client.create_bucket(Bucket="bench-vllm")
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        yield "s3://bench-vllm/kv", {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    finally:
        server.terminate()
        server.wait()


def kvstore_connector(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"url": url}
    if storage_options:
        extra["storage_options"] = storage_options
    return {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def example_connector(path: str) -> dict[str, Any]:
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": path},
    }


@contextmanager
def engine(model: Path, max_len: int, connector: dict[str, Any] | None) -> Iterator[Any]:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = {}
    if connector is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(**connector)
    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=max_len,
        enforce_eager=True,
        kv_cache_memory_bytes=2 << 30,
        max_num_batched_tokens=max_len,  # one step per prefill: ExampleConnector saves only a prompt's first step
        seed=0,
        **kwargs,
    )
    try:
        generate(llm, list(range(5, 21)))  # warm-up, below the connectors' minimum
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()  # connectors finish their saves here
        del llm
        gc.collect()


def generate(llm: Any, tokens: list[int]) -> tuple[float, int, list[int]]:
    """One prompt, one token: (seconds, vLLM's num_cached_tokens, the token)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    (out,) = llm.generate(
        [TokensPrompt(prompt_token_ids=tokens)], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False
    )
    return time.perf_counter() - t0, out.num_cached_tokens, list(out.outputs[0].token_ids)


def run(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    max_len = max(args.lengths) + 2 * BLOCK
    prompts = {
        n: torch.randint(3, preset["vocab"], (n + 2,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in args.lengths
    }
    times: dict[int, dict[str, float]] = {n: {} for n in args.lengths}
    outputs: dict[int, dict[str, list[int]]] = {n: {} for n in args.lengths}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, moto_server() as (s3_url, s3_options):
        model = Path(tmp) / "model"
        params = build_model(model, preset, max_len)
        example_dir, local_url = str(Path(tmp) / "example"), str(Path(tmp) / "kvstore")
        stores = {
            "ExampleConnector": example_connector(example_dir),
            "kvstore local": kvstore_connector(local_url),
            "kvstore s3": kvstore_connector(s3_url, s3_options),
        }
        with engine(model, max_len, None) as llm:
            for n, prompt in prompts.items():
                times[n]["recompute"], _, outputs[n]["recompute"] = generate(llm, prompt)
                hits = [generate(llm, prompt) for _ in range(args.reps)]
                assert all(cached == n for _, cached, _ in hits), hits
                times[n]["prefix cache"] = statistics.median(t for t, _, _ in hits)
                outputs[n]["prefix cache"] = hits[0][2]
                hit_ms = times[n]["prefix cache"] * 1e3
                print(f"{n:>6} recompute {times[n]['recompute']:.2f} s, prefix cache {hit_ms:.0f} ms", flush=True)
        multi = {
            "kv_connector": "MultiConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"connectors": list(stores.values())},
        }
        with engine(model, max_len, multi) as llm:  # one prefill per prompt saves to all three stores
            for prompt in prompts.values():
                generate(llm, prompt)
        for method, connector in stores.items():
            with engine(model, max_len, connector) as llm:
                for n, prompt in prompts.items():
                    hits = []
                    for _ in range(args.reps):
                        llm.reset_prefix_cache()
                        hits.append(generate(llm, prompt))
                    assert all(cached == n for _, cached, _ in hits), (method, hits)
                    times[n][method] = statistics.median(t for t, _, _ in hits)
                    outputs[n][method] = hits[0][2]
                    print(f"{n:>6} {method} {times[n][method] * 1e3:.0f} ms", flush=True)
    for n in args.lengths:
        assert len({tuple(v) for v in outputs[n].values()}) == 1, (n, outputs[n])
    kv_per_token = 2 * preset["layers"] * preset["kv_heads"] * preset["head_dim"] * 2
    title = (
        f"vLLM {_vllm_version()} (CPU) TTFT, {params / 1e6:.0f}M-param Llama ({preset['layers']} layers, hidden "
        f"{preset['hidden']}, {preset['heads']} query and {preset['kv_heads']} KV heads x {preset['head_dim']}, bf16, "
        f"{kv_per_token // 1024} KiB KV/token), {os.cpu_count()} CPUs; hits: median of {args.reps}"
    )
    print(write_outputs(args.out, times, kv_per_token, title))


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def write_outputs(out: Path, times: dict[int, dict[str, float]], kv_per_token: int, title: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    header = [
        "reused tokens",
        "KV MiB",
        *[f"{m} ms" for m in METHODS],
        "kvstore local / Example",
        "kvstore local / prefix cache",
        "recompute / kvstore local",
        "recompute / kvstore s3",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with (out / "vllm_ttft.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for n, t in times.items():
            cells = [
                str(n),
                f"{n * kv_per_token / 2**20:.4g}",
                *[f"{t[m] * 1e3:.1f}" for m in METHODS],
                f"{t['kvstore local'] / t['ExampleConnector']:.2f}x",
                f"{t['kvstore local'] / t['prefix cache']:.2f}x",
                f"{t['recompute'] / t['kvstore local']:.1f}x",
                f"{t['recompute'] / t['kvstore s3']:.1f}x",
            ]
            w.writerow(cells)
            lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "vllm_ttft.md").write_text(f"{title}\n\n{table}\n")
    (out / "vllm_ttft.json").write_text(json.dumps({"title": title, "seconds": times}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        ax.plot(list(times), [times[n][m] * 1e3 for n in times], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("reused context (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "vllm_ttft.png", dpi=120)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="multiples of 128")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tmp", default=None, help="parent of the model and the local stores (default: the system's)")
    p.add_argument("--quick", action="store_true", help="the tiny model at 256 and 512 tokens, into ./bench-vllm-out")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.lengths, args.reps, args.out = "tiny", [256, 512], 2, Path("bench-vllm-out")
    if any(n % BLOCK for n in args.lengths):
        p.error(f"--lengths must be multiples of {BLOCK} (vLLM's CPU block size)")
    return args


if __name__ == "__main__":
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    run(parse_args())
