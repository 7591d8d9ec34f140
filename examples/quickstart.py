"""Quickstart: save the KV cache of a prompt to a local directory, then load it back.

    python examples/quickstart.py [STORE_URL]

STORE_URL defaults to ./kvstore-demo (any fsspec URL works: memory://, s3://...).
The KV tensors here stand in for what a model's prefill produces.
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch

import kvstore

SPEC = kvstore.ModelSpec(
    name="demo-llama",
    version="2026-11-25",  # a new version for any change of weights
    num_layers=16,
    num_kv_heads=4,
    head_dim=128,
    dtype=torch.bfloat16,
)


def fake_prefill(tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) of shape [tokens, kv_heads, head_dim], as a model's prefill would give."""
    gen = torch.Generator().manual_seed(0)
    shape = (len(tokens), SPEC.num_kv_heads, SPEC.head_dim)
    return [
        (torch.randn(shape, generator=gen).to(SPEC.dtype), torch.randn(shape, generator=gen).to(SPEC.dtype))
        for _ in range(SPEC.num_layers)
    ]


async def main(url: str) -> None:
    system_prompt = list(range(1000, 1000 + 4000))  # a long shared prefix: 4000 tokens
    kv = fake_prefill(system_prompt)

    async with kvstore.open(url) as store:
        t0 = time.perf_counter()
        saved = await store.save_prefix(SPEC, system_prompt, kv)
        t_save = time.perf_counter() - t0
        print(
            f"saved    {saved.num_tokens} tokens to {store.url}: {saved.chunks_written} chunks written, "
            f"{saved.chunks_skipped} already there, {saved.bytes_written / 2**20:.1f} MiB in {t_save * 1e3:.0f} ms"
        )

        # The same prefix followed by a new question: the cached part hits.
        prompt = [*system_prompt, 7, 8, 9]
        print(f"lookup   {await store.lookup(SPEC, prompt)} of {len(prompt)} tokens are cached")

        t0 = time.perf_counter()
        hit = await store.load_prefix(SPEC, prompt, device="cpu")
        t_load = time.perf_counter() - t0
        k0, _ = hit.kv[0]
        print(
            f"loaded   {hit.num_tokens} tokens ({hit.chunks_loaded} chunks, {hit.bytes_read / 2**20:.1f} MiB) "
            f"in {t_load * 1e3:.0f} ms; layer 0 K {tuple(k0.shape)} {k0.dtype}"
        )
        same = all(
            torch.equal(k, ok[: hit.num_tokens]) and torch.equal(v, ov[: hit.num_tokens])
            for (k, v), (ok, ov) in zip(hit.kv, kv, strict=True)
        )
        print(f"verified bit-exact: {same}; only {len(prompt) - hit.num_tokens} tokens left to prefill")
        if not same:
            raise SystemExit("loaded KV differs from what was saved")

        again = await store.save_prefix(SPEC, system_prompt, kv)
        print(f"re-save  wrote {again.chunks_written} chunks (deduplicated {again.chunks_skipped})")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "kvstore-demo"))
