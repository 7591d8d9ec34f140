"""Hit and miss accounting of loads, by token and by chunk: what a cache is judged by.

Chains start at token 0 and every chunk but a saved tail is ``chunk_tokens``
long, so a hit of ``n`` tokens covers ``ceil(n / chunk_tokens)`` chunks of the
query and the rest of the query's chunks are misses. Counting from tokens keeps
the chunk figures right for hits served from a background save's host copy too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HitCounters"]


@dataclass(slots=True)
class HitCounters:
    """Cumulative tokens and chunks that loads asked for and got (the store's counters extend it)."""

    load_tokens: int = 0
    load_tokens_hit: int = 0
    load_chunks: int = 0
    load_chunks_hit: int = 0

    def count_load(self, requested: int, hit: int, chunk_tokens: int) -> None:
        """One load that returned a result: ``hit`` of the ``requested`` tokens came from the cache."""
        self.load_tokens += requested
        self.load_tokens_hit += hit
        self.load_chunks += -(-requested // chunk_tokens)
        self.load_chunks_hit += -(-hit // chunk_tokens)
