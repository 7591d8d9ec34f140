"""Prefill/decode hand-off through the store (the Mooncake pattern), in two separate processes.

    python examples/prefill_decode.py [STORE_URL] [--url s3://bucket/kv -o endpoint_url=...] [--moto]

A prefill worker computes the KV of incoming prompts and saves it; a decode worker, in
another process, loads it, computes only the last prompt token and generates. STORE_URL
(or --url) defaults to ./kvstore-handoff; ``-o key=value`` passes storage options (e.g. an
S3 endpoint); ``--moto`` runs the hand-off through s3:// on a local moto server instead.
The decode worker checks its output against a full recompute and exits non-zero on a
mismatch. The model is a small Llama with random weights (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvstore
import kvstore.hf

VOCAB = 4096


def build_model() -> LlamaForCausalLM:
    """The same ~30M-parameter random Llama in every process (fixed seed)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
        dtype="float32",
    )
    return LlamaForCausalLM(config).eval()


def spec_of(model: LlamaForCausalLM) -> kvstore.ModelSpec:
    return kvstore.ModelSpec.from_pretrained_config(model.config, name="handoff-demo-llama", version="random-seed-0")


async def prefill_worker(url: str, options: dict[str, Any] | None, prompts: list[list[int]]) -> int:
    model = build_model()
    spec = spec_of(model)
    async with kvstore.open(url, storage_options=options) as store:
        for i, prompt in enumerate(prompts):
            out = await kvstore.hf.prefill(store, spec, model, prompt, save=True)
            assert out.saved is not None
            print(
                f"prefill  prompt {i}: {len(prompt)} tokens computed in {out.ttft_s * 1e3:.0f} ms, saved "
                f"{out.saved.chunks_written} chunks ({out.saved.bytes_written / 2**20:.1f} MiB)"
            )
    return 0


async def decode_worker(url: str, options: dict[str, Any] | None, prompts: list[list[int]], new_tokens: int) -> int:
    model = build_model()
    spec = spec_of(model)
    failures = 0
    await kvstore.hf.generate(None, spec, model, list(range(3, 67)), 2)  # warm-up, so the first timing is fair
    async with kvstore.open(url, storage_options=options) as store:
        for i, prompt in enumerate(prompts):
            out = await kvstore.hf.generate(store, spec, model, prompt, new_tokens, save=False)
            ref = await kvstore.hf.generate(None, spec, model, prompt, new_tokens)  # full recompute, to check
            ok = out.tokens == ref.tokens and out.cached_tokens == len(prompt) - 1
            failures += not ok
            print(
                f"decode   prompt {i}: loaded {out.cached_tokens} tokens, computed {out.computed_tokens}; "
                f"TTFT {out.ttft_s * 1e3:.0f} ms vs {ref.ttft_s * 1e3:.0f} ms recomputing; "
                f"{new_tokens} tokens {'identical' if ok else 'MISMATCH'}"
            )
    return 1 if failures else 0


def start_moto() -> tuple[Any, str, dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 (free port) with a fresh bucket; its URL and storage options."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"handoff-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    return server, f"s3://{bucket}/kv", options


def drive(url: str, options: dict[str, Any] | None, num_prompts: int, prompt_tokens: int, new_tokens: int) -> int:
    """Start the prefill worker, then the decode worker, each a separate Python process."""
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(3, VOCAB, (prompt_tokens // 2,), generator=gen).tolist()  # e.g. a shared document
    questions = [torch.randint(3, VOCAB, (prompt_tokens // 2,), generator=gen).tolist() for _ in range(num_prompts)]
    prompts = [[*shared, *q] for q in questions]
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"url": url, "options": options, "prompts": prompts, "new_tokens": new_tokens}))
        print(f"store {url}")
        for role in ("prefill", "decode"):
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, __file__, "--worker", role, str(job)], check=False).returncode
            print(f"{role} worker (its own process) finished in {time.perf_counter() - t0:.1f} s, exit {rc}")
            if rc:
                return rc
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", nargs="?", default="kvstore-handoff", help="store URL or directory")
    parser.add_argument("--url", help="store URL (overrides STORE_URL), e.g. s3://bucket/kv")
    parser.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--moto", action="store_true", help="use s3:// on a local moto server")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--worker", nargs=2, metavar=("ROLE", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        role, path = args.worker
        job = json.loads(Path(path).read_text())
        if role == "prefill":
            return asyncio.run(prefill_worker(job["url"], job["options"], job["prompts"]))
        return asyncio.run(decode_worker(job["url"], job["options"], job["prompts"], job["new_tokens"]))

    options: dict[str, Any] | None = dict(kv.split("=", 1) for kv in args.storage_option) or None
    url = args.url or args.store
    server = None
    if args.moto:
        server, url, options = start_moto()
    try:
        return drive(url, options, args.prompts, args.prompt_tokens, args.new_tokens)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
