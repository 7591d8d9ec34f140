"""Multi-turn chat with a transformers model: each turn loads the conversation so far from the store.

    python examples/chat_multiturn.py [STORE_URL] [--turns 4]

STORE_URL defaults to ./kvstore-chat (a local directory; memory:// and s3:// work too).
The model is a small Llama with random weights (nothing is downloaded) and the "chat"
is random token ids: what matters is that each turn prefills only its new tokens and
generates exactly what a full recompute generates. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import asyncio

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvstore
import kvstore.hf


def build_model() -> LlamaForCausalLM:
    """A ~30M-parameter Llama (GQA), small enough for a 2-core CPU."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
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


async def main(url: str, turns: int, system_tokens: int, user_tokens: int, new_tokens: int) -> int:
    model = build_model()
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="chat-demo-llama", version="random-seed-0")
    gen = torch.Generator().manual_seed(1)

    def user_says(n: int) -> list[int]:
        return torch.randint(3, 4096, (n,), generator=gen).tolist()

    history = user_says(system_tokens)  # a long system prompt, shared by every turn
    await kvstore.hf.generate(None, spec, model, user_says(64), 2)  # warm-up, so turn 1's timings are fair
    failures = 0
    async with kvstore.open(url) as store:
        print(f"store {store.url}; {spec.bytes_per_token / 1024:.0f} KiB of KV per token")
        print("turn  prompt  cached  new  TTFT cached  TTFT no cache  speed-up  same output")
        for turn in range(1, turns + 1):
            prompt = [*history, *user_says(user_tokens)]
            fresh = await kvstore.hf.generate(None, spec, model, prompt, new_tokens)  # full recompute
            hit = await kvstore.hf.generate(store, spec, model, prompt, new_tokens)  # loads, then saves the turn
            same = hit.tokens == fresh.tokens
            failures += not same
            print(
                f"{turn:4d}  {len(prompt):6d}  {hit.cached_tokens:6d}  {hit.computed_tokens:3d}"
                f"  {hit.ttft_s * 1e3:8.0f} ms  {fresh.ttft_s * 1e3:10.0f} ms"
                f"  {fresh.ttft_s / hit.ttft_s:7.1f}x  {same}"
            )
            history = [*prompt, *hit.tokens]
    if failures:
        print(f"MISMATCH in {failures} turn(s)")
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default="kvstore-chat", help="store URL or directory")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--user-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.url, args.turns, args.system_tokens, args.user_tokens, args.new_tokens)))
