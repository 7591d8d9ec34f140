"""Tiny transformers models built from configs (random weights; nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("llama", "qwen2")


def build(kind: str, dtype: str = "float32", seed: int = 0) -> Any:
    """A small causal LM with GQA (4 query heads, 2 KV heads), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "attn_implementation": "sdpa",
        "dtype": dtype,
    }
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    return model.to(getattr(torch, dtype)).eval()
