"""Checking caller KV tensors and viewing tensor memory as bytes (no copies)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvstore.errors import InvalidInputError
from kvstore.results import LayerKV
from kvstore.spec import ModelSpec

__all__ = ["byte_view", "check_kv", "empty_kv", "host_copy", "host_kv"]


def check_kv(spec: ModelSpec, kv: Sequence[LayerKV], num_tokens: int) -> None:
    """Raise InvalidInputError unless ``kv`` matches ``spec`` and ``num_tokens`` exactly."""
    if isinstance(kv, torch.Tensor) or not isinstance(kv, Sequence):
        raise InvalidInputError("kv must be a sequence of per-layer (K, V) pairs")
    if len(kv) != spec.num_layers:
        raise InvalidInputError(f"kv has {len(kv)} layers, the spec says {spec.num_layers}")
    want = (num_tokens, spec.num_kv_heads, spec.head_dim)
    for layer, pair in enumerate(kv):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidInputError(f"kv[{layer}] must be a (K, V) pair")
        for name, t in zip("KV", pair, strict=True):
            if not isinstance(t, torch.Tensor):
                raise InvalidInputError(f"kv[{layer}] {name} is a {type(t).__name__}, not a torch.Tensor")
            if tuple(t.shape) != want:
                raise InvalidInputError(
                    f"kv[{layer}] {name} has shape {tuple(t.shape)}, expected [tokens, heads, head_dim] = {list(want)}"
                )
            if t.dtype != spec.dtype:
                raise InvalidInputError(f"kv[{layer}] {name} has dtype {t.dtype}, the spec says {spec.dtype}")


def host_kv(kv: Sequence[LayerKV], start: int = 0, stop: int | None = None, *, copy: bool = False) -> list[LayerKV]:
    """Contiguous CPU tokens ``[start:stop]`` of every layer: views where they already are, unless ``copy``."""
    return [(host_copy(k[start:stop], copy=copy), host_copy(v[start:stop], copy=copy)) for k, v in kv]


def host_copy(t: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
    """``t`` contiguous on the CPU: itself where it already is, unless ``copy``."""
    t = t.detach()
    if copy:  # one copy, contiguous, whatever the source's device and strides
        return t.to("cpu", copy=True, memory_format=torch.contiguous_format)
    return t.to("cpu").contiguous()


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's memory (writable, shares storage)."""
    return t.view(-1).view(torch.uint8).numpy()


def empty_kv(spec: ModelSpec, device: torch.device | str) -> tuple[LayerKV, ...]:
    shape = (0, spec.num_kv_heads, spec.head_dim)
    return tuple(
        (torch.empty(shape, dtype=spec.dtype, device=device), torch.empty(shape, dtype=spec.dtype, device=device))
        for _ in range(spec.num_layers)
    )
