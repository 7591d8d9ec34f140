"""How much of a chain is stored, with a few HEADs instead of one per chunk.

A chain is stored from its start: saves write it in order, the GC keeps what a
live model reaches (unreachable chunks after a missing one are garbage), and
eviction removes the ends of chains first. So presence along a chain is
monotone, and its first missing chunk can be found by probing: one round of
HEADs at evenly spaced chunks (the first and the last among them), then one
round over the segment where presence flips. A 64-chunk chain costs 9 HEADs
when it is absent or stored whole, and at most 16 otherwise, instead of 64 —
on S3 a request is what a server and the bill count.

Where presence is not monotone (a damaged chunk deleted by repair and not yet
rewritten, a concurrent writer mid-way), the answer can be too long: callers
must treat a chunk that turns out to be missing as the end of the hit (loads)
or leave it to the GC (saves: the chunks after the hole are unreachable, the GC
collects them after its grace, and the next save rewrites the whole suffix).
``lookup`` does not probe: it reports what is there, HEADing every chunk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from kvstore.storage import ObjectMeta

__all__ = ["PROBES", "find_first_missing", "probe_points"]

PROBES = 8
"""Evenly spaced probes in the first round (besides chunk 0); chains up to twice this long are HEADed whole."""

HeadMany = Callable[[Sequence[str]], Awaitable[list[ObjectMeta | None]]]


def probe_points(n: int, probes: int = PROBES) -> list[int]:
    """The first round's chunks of an ``n``-chunk chain: 0, every ``ceil(n / probes)``-th, and the last."""
    step = -(-n // probes)
    return sorted({0, *range(step - 1, n, step), n - 1})


async def find_first_missing(
    head_many: HeadMany, paths: Sequence[str], probes: int = PROBES
) -> tuple[int, dict[int, ObjectMeta | None]]:
    """``(b, seen)``: the chain's first missing object is ``paths[b]`` (``len(paths)`` if none), assuming presence
    is monotone; ``seen`` maps each HEADed index to its metadata (None: absent).

    Every index below ``b`` was either HEADed present or lies between two present probes.
    """
    n = len(paths)
    if n <= 2 * probes:
        metas = await head_many(paths)
        seen = dict(enumerate(metas))
        return next((i for i, m in seen.items() if m is None), n), seen
    points = probe_points(n, probes)
    seen = dict(zip(points, await head_many([paths[i] for i in points]), strict=True))
    first = next((i for i in points if seen[i] is None), n)
    below = max((i for i in points if i < first), default=-1)  # present (``first`` is the first absent probe)
    between = list(range(below + 1, min(first, n)))
    if between:
        seen.update(zip(between, await head_many([paths[i] for i in between]), strict=True))
        first = next((i for i in between if seen[i] is None), first)
    return first, seen
