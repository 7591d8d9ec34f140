"""The random-weight Llama the vLLM tests serve (built in the vLLM environment, whose transformers vLLM reads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def build(path: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, dtype="bfloat16"))
    model.to(torch.bfloat16).save_pretrained(path)
