"""vLLM's paged KV cache of one layer seen as K and V pages, and copies between pages and token rows.

vLLM 0.32 hands every backend's per-layer cache to connectors as a logical
``[blocks, heads, block_size, C]`` view, ``C = head_size + head_size_v`` (K then V;
the CPU backend stores exactly that, GPU backends other physical orders behind the
same view). Older GPU layouts, ``[2, blocks, block_size, heads, head_size]`` (flash
attention) and ``[blocks, 2, block_size, heads, head_size]`` (flashinfer), are read
the same way. kvstore's rows are ``[tokens, heads, head_dim]`` per K and V.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PagedLayer", "UnsupportedLayoutError"]


class UnsupportedLayoutError(ValueError):
    """The cache tensor has a shape this module does not map (the connector then stays off)."""


class PagedLayer:
    """K and V pages of one layer, each a ``[blocks, heads, block_size, head_size]`` view of vLLM's tensor."""

    def __init__(self, cache: torch.Tensor, *, num_kv_heads: int, head_size: int, block_size: int) -> None:
        h, d, n = num_kv_heads, head_size, block_size
        shape = tuple(cache.shape)
        if cache.ndim == 4 and shape[1:] == (h, n, 2 * d):  # logical [B, H, N, C]
            self.k, self.v = cache[..., :d], cache[..., d:]
        elif cache.ndim == 5 and shape[0] == 2 and shape[2:] == (n, h, d):  # [2, B, N, H, D]
            self.k, self.v = cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
        elif cache.ndim == 5 and shape[1] == 2 and shape[2:] == (n, h, d):  # [B, 2, N, H, D]
            self.k, self.v = cache[:, 0].permute(0, 2, 1, 3), cache[:, 1].permute(0, 2, 1, 3)
        else:
            raise UnsupportedLayoutError(
                f"KV cache of shape {list(shape)} does not match {h} KV heads x {d}, block size {n}"
            )
        self.block_size = n
        self.device = cache.device

    def _blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)

    def write(self, block_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy rows ``[len(block_ids) * block_size, H, D]`` of K and V into those blocks, in order."""
        nb, n = len(block_ids), self.block_size
        if k.shape[0] != nb * n or v.shape[0] != nb * n:
            raise ValueError(f"{k.shape[0]} rows do not fill {nb} blocks of {n}")
        if nb == 0:
            return
        idx = self._blocks(block_ids)
        for pages, rows in ((self.k, k), (self.v, v)):
            src = rows.to(pages.device, non_blocking=True).view(nb, n, *rows.shape[1:]).permute(0, 2, 1, 3)
            pages[idx] = src

    def read(self, block_ids: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``num_tokens`` rows held by those blocks, as new contiguous ``[tokens, H, D]`` K and V."""
        n = self.block_size
        if not 0 <= num_tokens <= len(block_ids) * n:
            raise ValueError(f"{num_tokens} tokens do not fit in {len(block_ids)} blocks of {n}")
        idx = self._blocks(block_ids[: -(-num_tokens // n)])
        out = []
        for pages in (self.k, self.v):
            rows = pages[idx].permute(0, 2, 1, 3)  # [blocks, N, H, D], a fresh tensor
            out.append(rows.reshape(-1, *rows.shape[2:])[:num_tokens].contiguous())
        return out[0], out[1]
