"""Eviction order by recency, as pure array code (no I/O): what ``kvstore gc --max-bytes/--max-idle`` deletes first.

A chunk is useless without every chunk before it in its chain, so a chunk's
worth is its *subtree recency*: the latest use of the chunk or of any chunk
that extends it. Chunks are evicted by ascending subtree recency, then by
descending chain index: children always come before their parents, so evicting
any prefix of the order never removes a chunk that a kept chunk depends on, and
never a chunk more recently used (through its descendants) than one kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EvictionCandidates", "eviction_order", "last_use", "plan_prefix", "subtree_recency"]


def subtree_recency(keys: np.ndarray, parents: np.ndarray, index: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Per chunk, the max of its own ``last`` use and that of every chunk below it (one model's reachable chunks).

    ``keys``/``parents`` are uint64 key prefixes, ``index`` the chain positions.
    Propagates level by level from the highest index down to index 0.
    """
    rec = np.asarray(last, np.float64).copy()
    if len(keys) == 0:
        return rec
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    idx = np.asarray(index, np.int64)
    by_level = np.argsort(-idx, kind="stable")
    levels = idx[by_level]
    bounds = np.flatnonzero(np.diff(levels)) + 1
    for group in np.split(by_level, bounds):
        if idx[group[0]] == 0:
            break
        pos = np.minimum(np.searchsorted(sorted_keys, parents[group]), len(sorted_keys) - 1)
        found = sorted_keys[pos] == parents[group]
        np.maximum.at(rec, by_key[pos[found]], rec[group[found]])
    return rec


def last_use(keys: np.ndarray, mtimes: np.ndarray, access_keys: np.ndarray, access_times: np.ndarray) -> np.ndarray:
    """max(data object mtime, latest access-record time) per chunk; ``access_keys`` sorted and unique."""
    out = np.asarray(mtimes, np.float64).copy()
    if len(access_keys) and len(keys):
        pos = np.minimum(np.searchsorted(access_keys, keys), len(access_keys) - 1)
        hit = access_keys[pos] == keys
        out[hit] = np.maximum(out[hit], access_times[pos[hit]].astype(np.float64))
    return out


@dataclass(slots=True)
class EvictionCandidates:
    """Every reachable chunk of the live models, one row each, and the order to evict them in.

    ``model`` indexes the caller's list of models; ``row`` the chunk within its model.
    """

    model: np.ndarray
    row: np.ndarray
    keys: np.ndarray
    parents: np.ndarray
    index: np.ndarray
    sizes: np.ndarray
    recency: np.ndarray
    order: np.ndarray


def eviction_order(
    keys: list[np.ndarray],
    parents: list[np.ndarray],
    index: list[np.ndarray],
    sizes: list[np.ndarray],
    last: list[np.ndarray],
) -> EvictionCandidates:
    """Concatenate the models' chunks and order them: ascending subtree recency, then descending index."""
    recs = [subtree_recency(k, p, i, t) for k, p, i, t in zip(keys, parents, index, last, strict=True)]

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(0, dtype)

    rec = cat(recs, np.float64)
    idx = cat(index, np.int64)
    model = np.concatenate([np.full(len(k), m, np.int64) for m, k in enumerate(keys)]) if keys else np.zeros(0, int)
    row = np.concatenate([np.arange(len(k)) for k in keys]) if keys else np.zeros(0, np.int64)
    order = np.lexsort((-idx, rec))
    return EvictionCandidates(
        model, row, cat(keys, np.uint64), cat(parents, np.uint64), idx, cat(sizes, np.int64), rec, order
    )


def plan_prefix(
    cands: EvictionCandidates,
    total_bytes: int,
    *,
    max_bytes: int | None,
    idle_before: float | None,
    protect_from: float,
) -> tuple[int, bool]:
    """(how many leading chunks of the order to evict, whether the byte budget is then met).

    Evicts every chunk whose subtree recency is before ``idle_before`` and as many
    more as bring ``total_bytes`` to ``max_bytes`` or below; never a chunk whose
    subtree recency is ``protect_from`` or later (the grace).
    """
    rec = cands.recency[cands.order]
    allowed = int(np.searchsorted(rec, protect_from, side="left"))
    n_idle = int(np.searchsorted(rec, idle_before, side="left")) if idle_before is not None else 0
    n_bytes = 0
    if max_bytes is not None and total_bytes > max_bytes:
        freed = np.cumsum(cands.sizes[cands.order])
        n_bytes = int(np.searchsorted(freed, total_bytes - max_bytes, side="left")) + 1
    n = min(max(n_idle, n_bytes), allowed)
    freed_n = int(cands.sizes[cands.order[:n]].sum())
    met = max_bytes is None or total_bytes - freed_n <= max_bytes
    return n, met
