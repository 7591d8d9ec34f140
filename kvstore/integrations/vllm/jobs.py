"""What the scheduler-side connector tells the worker-side one for each step (plain, picklable data)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadJob", "SaveJob", "StepPlan"]


@dataclass(frozen=True, slots=True)
class LoadJob:
    """Load the store's prefix of ``tokens`` and copy tokens ``[start, end)`` into ``block_ids``.

    ``tokens`` is the prefix the lookup found (the worker asks for exactly it, so it
    joins the scheduler's prefetch); ``start`` and ``end`` are multiples of the block
    size, ``end <= len(tokens)``; ``block_ids`` holds the ``(end - start) / block_size``
    blocks vLLM allocated for them.
    """

    req_id: str
    version: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]


@dataclass(frozen=True, slots=True)
class SaveJob:
    """Save the KV of ``tokens`` (the whole prompt, now computed) held by ``block_ids`` in order."""

    req_id: str
    version: str
    tokens: list[int]
    block_ids: list[int]


@dataclass(slots=True)
class StepPlan:
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
