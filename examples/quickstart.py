"""Quickstart: a transformer's long shared prompt is prefilled once, saved, and loaded the next time.

    python examples/quickstart.py [STORE_URL]

STORE_URL defaults to ./kvstore-demo (any fsspec URL works: memory://, s3://...).
The model is a small Llama with random weights (nothing is downloaded). Call 1 sends
a 4096-token system prompt plus a question: the store misses, the model prefills
everything and kvstore saves the KV. Call 2 sends the same system prompt with another
question: the store hits, and only the new question is prefilled. The demo prints the
time to first token (TTFT) of both and checks call 2 against a full recompute.
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvstore
import kvstore.hf


def build_model() -> LlamaForCausalLM:
    """A ~20M-parameter Llama with grouped-query attention, quick on two CPU cores."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


async def main(url: str) -> None:
    model = build_model()
    spec = kvstore.ModelSpec.from_pretrained_config(
        model.config, name="demo-llama", version="2026-11-25", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(1)
    system_prompt = torch.randint(0, 8192, (4096,), generator=gen).tolist()  # the long shared prefix
    question_1 = torch.randint(0, 8192, (24,), generator=gen).tolist()
    question_2 = torch.randint(0, 8192, (24,), generator=gen).tolist()
    print(
        f"model    Llama, {spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}, "
        f"{spec.dtype_name}, random weights; KV {spec.bytes_per_token / 1024:.0f} KiB per token"
    )

    async with kvstore.open(url) as store:
        first = await kvstore.hf.prefill(store, spec, model, system_prompt + question_1, save=True)
        written, skipped = (first.saved.chunks_written, first.saved.chunks_skipped) if first.saved else (0, 0)
        print(
            f"call 1   {first.cached_tokens} tokens from the cache, {first.computed_tokens} prefilled: "
            f"TTFT {first.ttft_s * 1e3:.0f} ms; saved to {store.url}: "
            f"{written} chunks written, {skipped} already there"
        )
        prompt = system_prompt + question_2
        second = await kvstore.hf.prefill(store, spec, model, prompt)
        print(
            f"call 2   {second.cached_tokens} tokens from the cache, {second.computed_tokens} prefilled: "
            f"TTFT {second.ttft_s * 1e3:.0f} ms"
        )

    t0 = time.perf_counter()
    full = await kvstore.hf.prefill(None, spec, model, prompt)  # the same prompt without any cache
    t_full = time.perf_counter() - t0
    diff = (second.logits - full.logits).abs().max().item()
    same = second.cached_tokens > 0 and diff <= 1e-4 and bool(second.logits.argmax() == full.logits.argmax())
    speedup = t_full / second.ttft_s
    print(f"no cache TTFT {t_full * 1e3:.0f} ms for the same prompt: the cache hit is {speedup:.1f}x faster")
    print(f"verified next-token logits equal a full recompute (max |diff| {diff:.1e}): {same}")
    if not same:
        raise SystemExit("the cached prefill differs from a full recompute")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "kvstore-demo"))
